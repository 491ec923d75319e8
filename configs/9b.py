"""IDEFICS-9B: LLaMA-7B + ViT-H/14, a gated cross-attention block every 4 layers (published config).

    python -m idefics_jax.plan --config configs/9b.py

Layout: pure FSDP over all GPUs (fsdp=-1), the frozen LLaMA-7B and ViT kept whole on every GPU
(14 GB in bf16) so no step re-gathers them; at 4096 wide, tensor parallelism would spend more time
in NVLink all-reduces than it saves (see docs/cluster.md, "The plan"). Remat "dots_no_batch" (every
weight matmul's output saved; 1.03x the model FLOPs instead of full remat's 1.37x) with 2 rows per
GPU per micro-batch: 69.4 GB, estimated MFU 72.9% (full remat, 4 rows: 58.4 GB, 54.7%). Measured on
one H200 (4 layers of this width, 4 x 1024 tokens): 48.6 ms per step against 57.7 with full remat.
"""

from configs import common


def get_config():
    c = common.base(
        common.published(
            hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, rms_norm_eps=1e-6
        )
    )
    c.mesh.fsdp, c.mesh.tensor = -1, 1
    common.web_mixture(c)
    c.data.global_batch_size = 1280  # x 1024 tokens = 1.31M tokens per step, as IDEFICS-9B
    c.train.micro_batches = 10  # 128 rows per micro-batch: 2 per GPU on 64 GPUs
    c.model.remat = "dots_no_batch"
    c.train.steps = 60_000
    c.train.optimizer.update(lr=1e-5, end_lr=6e-6, warmup_steps=2000, decay_steps=60_000)
    c.train.frozen_dtype = "bfloat16"
    c.train.frozen_sharding_rules = common.without_fsdp()  # frozen LLaMA/ViT never re-gathered
    c.train.checkpoint_every = 250
    c.train.keep_period = 5000
    return c
