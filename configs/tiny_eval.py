"""configs/tiny.py plus few-shot documents, so that the tiny model learns the evaluation prompts'
format, and the tiny captioning / VQA tasks evaluated during training.

    python -m idefics_jax.train --config configs/tiny_eval.py

trains 800 steps (workdir ./workdir/tiny_eval; about 6 s a step on a busy 2-core CPU, so run it
where there are more cores) on the tiny mixture with 40% of the rows drawn from
few-shot documents ("<image>Caption: a red circle\\n<image>Question: What shape is this? Answer:
circle\\n" ...); every 400 steps it scores the tiny COCO (CIDEr) and VQAv2 (VQA accuracy) tasks at 0
and 4 shots, logged as eval/coco/0shot ... in metrics.jsonl and TensorBoard. Sequences are 256
tokens long: a 4-shot VQA prompt is about 170 tiny-tokenizer tokens. Evaluate the result with

    python -m idefics_jax.eval --ckpt workdir/tiny_eval/checkpoints --tokenizer <tiny>/tokenizer \\
        --task coco --data <tiny>/eval-v1/coco --shots 0,4 --output /tmp/tiny-eval

(`idefics_jax.data.tiny.eval_tasks()` returns the paths; docs/evaluation.md has the scores measured so far).
"""

from configs import tiny as tiny_config
from idefics_jax.data import tiny


def get_config():
    c = tiny_config.get_config()
    p = tiny.eval_tasks()
    for ds in c.data.datasets.values():
        ds.weight *= 0.6
    c.data.datasets.fewshot = {"kind": "documents", "paths": p["fewshot"], "weight": 0.4}
    c.data.seq_len = 256
    c.data.max_num_images = 6
    c.eval_data.seq_len = 256
    c.eval_data.max_num_images = 6
    c.train.steps = 800
    c.train.optimizer.update(decay_steps=800)
    c.train.checkpoint_every = 400
    c.train.eval_every = 400
    c.train.eval_tasks = [
        dict(task="coco", data=p["coco"], shots=[0, 4], num_samples=40, every=400),
        dict(task="vqav2", data=p["vqav2"], shots=[0, 4], num_samples=80, every=400),
    ]
    c.workdir = "workdir/tiny_eval"
    return c
