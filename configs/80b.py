"""IDEFICS-80B: LLaMA-65B + ViT-H/14, a gated cross-attention block every 4 layers (published config),
laid out for 64 nodes x 8 A100-80GB.

    python -m idefics_jax.plan --config configs/80b.py

Layout: fsdp=64 (master weights and AdamW moments sharded across nodes) x tensor=8 (Megatron tensor
parallelism over NVLink) with sequence parallelism (the residual stream between layers split over
'tensor' along the sequence, so the tensor-parallel all-reduces become all-gathers into and
reduce-scatters out of the matmuls, which windowed einsum overlaps with them); the trainable weights
are gathered once per step as a bf16 compute copy (train.trainable_layout=zero1), so the micro-batch
count costs no network traffic, and 56 micro-batches of 1 row per GPU keep the activations small
enough for remat "dots_no_batch" (every weight matmul's output saved: 1.02x the model FLOPs). The
plan: 77.8 GB per GPU (CPU upper bound), estimated MFU 63.3% if windowed einsum hides the
sequence-parallel collectives under their matmuls, 48.8% if it hides none (without sequence
parallelism, remat "minimal": 78.6 GB, 38.4%); docs/cluster.md, "Sequence parallelism".
"""

from configs import common


def get_config():
    c = common.base(
        common.published(
            hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64, rms_norm_eps=1e-5
        )
    )
    c.mesh.fsdp, c.mesh.tensor = 64, 8
    c.sharding_rules = common.sequence_parallel()  # residual stream split over 'tensor' along the sequence
    common.web_mixture(c)
    c.data.global_batch_size = 3584  # x 1024 tokens = 3.67M tokens per step, as IDEFICS-80B
    c.model.remat = "dots_no_batch"
    c.train.trainable_layout = "zero1"
    c.train.micro_batches = 56  # 64 rows per micro-batch: 1 per FSDP shard (8 GPUs)
    c.train.steps = 40_000
    c.train.optimizer.update(lr=5e-5, end_lr=3e-5, warmup_steps=2000, decay_steps=40_000)
    c.train.frozen_dtype = "bfloat16"
    c.train.frozen_sharding_rules = common.without_fsdp()  # frozen LLaMA/ViT never re-gathered
    c.train.checkpoint_every = 250
    c.train.keep_period = 5000
    return c
