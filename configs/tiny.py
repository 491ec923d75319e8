"""Tiny IDEFICS for this CPU: every feature of the real model at toy size, fp32, trained on the
bundled tiny dataset (generated on first use, a few seconds).

    python -m idefics_jax.train --config configs/tiny.py

trains 600 steps in about five minutes on 2 CPU cores (workdir ./workdir/tiny unless --workdir is
given): the loss falls from ~6.3 (uniform over 514 tokens) to well under 1, with a held-out
evaluation and a checkpoint every 100 steps. The mixture is the tiny dataset's four formats plus
40% few-shot documents in the evaluation prompts' format ("<image>Caption: a red circle\n<image>
Question: What shape is this? Answer: circle\n" ...), so that at step 600 the model captions a
picture and answers the tiny VQA questions: it then scores the tiny COCO (CIDEr) and VQAv2 tasks
at 0 and 2 shots (logged as eval/coco/0shot ... in metrics.jsonl and TensorBoard).
"""

from configs import common
from idefics_jax.config import IdeficsConfig, PerceiverConfig, VisionConfig
from idefics_jax.data import tiny


def get_config():
    model = IdeficsConfig(
        vocab_size=512,
        additional_vocab_size=2,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        cross_layer_interval=2,
        qk_layer_norms=True,
        alpha_type="float",
        # The published models start every gate at 0 (tanh 0: the cross-attention contributes nothing
        # until the gate has moved). Here the gates start open (tanh 1 = 0.76) so the cross-attention
        # learns from step 1: with zero gates, 300 steps left VQA at 26 (chance 18.75) and 600 at 41;
        # open gates give 64 at 600 (docs/evaluation.md, "Tiny tasks").
        alpha_initializer="ones",
        use_resampler=True,
        freeze_text_layers=False,
        freeze_vision_layers=False,
        freeze_lm_head=False,
        vision=VisionConfig(
            embed_dim=48,
            image_size=32,
            intermediate_size=96,
            patch_size=8,
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_act="gelu",
        ),
        perceiver=PerceiverConfig(
            resampler_n_latents=8,
            resampler_depth=2,
            resampler_n_heads=4,
            resampler_head_dim=12,
            qk_layer_norms_perceiver=True,
        ),
        dtype="float32",
        param_dtype="float32",
        remat="none",
    )
    c = common.base(model)
    c.mesh.fsdp = -1
    tasks = tiny.eval_tasks()
    c.data = tiny.config()
    for ds in c.data.datasets.values():
        ds.weight *= 0.6
    c.data.datasets.fewshot = {"kind": "documents", "paths": tasks["fewshot"], "weight": 0.4}
    c.eval_data = tiny.config(split="heldout")
    # 128 tokens hold a 2-shot prompt (a 4-shot one is about 170 tiny-tokenizer tokens).
    for d in (c.data, c.eval_data):
        d.image_size = model.vision.image_size
        d.seq_len = 128
        d.max_num_images = 4
    c.train.steps = 600
    c.train.optimizer.update(lr=3e-3, end_lr=3e-4, warmup_steps=20, decay_steps=600, weight_decay=0.0)
    c.train.checkpoint_every = 100
    c.train.eval_every = 100
    c.train.log_every = 20
    c.train.guards.spike_window = 20
    c.train.eval_tasks = [
        dict(task="coco", data=tasks["coco"], shots=[0, 2], num_samples=40, every=600),
        dict(task="vqav2", data=tasks["vqav2"], shots=[0, 2], num_samples=80, every=600),
    ]
    c.train.peak_flops_per_device = 1e11  # rough fp32 peak of a 2-core CPU, for the MFU column
    c.workdir = "workdir/tiny"
    return c
