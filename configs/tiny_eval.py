"""configs/tiny.py trained longer on longer sequences, for higher few-shot scores and 4-shot prompts.

    python -m idefics_jax.train --config configs/tiny_eval.py

trains 800 steps (workdir ./workdir/tiny_eval; about 6 s a step on a busy 2-core CPU, so run it
where there are more cores) on configs/tiny.py's mixture (40% few-shot documents); every 400 steps
it scores the tiny COCO (CIDEr) and VQAv2 (VQA accuracy) tasks at 0 and 4 shots, logged as
eval/coco/0shot ... in metrics.jsonl and TensorBoard. Sequences are 256 tokens long: a 4-shot VQA
prompt is about 170 tiny-tokenizer tokens. Evaluate the result with

    python -m idefics_jax.eval --ckpt workdir/tiny_eval/checkpoints --tokenizer <tiny>/tokenizer \\
        --task coco --data <tiny>/eval-v1/coco --shots 0,4 --output /tmp/tiny-eval

(`idefics_jax.data.tiny.eval_tasks()` returns the paths; docs/evaluation.md has the scores measured so far).
"""

from configs import tiny as tiny_config
from idefics_jax.data import tiny


def get_config():
    c = tiny_config.get_config()
    p = tiny.eval_tasks()
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
