"""Few-shot evaluation with the Flamingo / IDEFICS protocol (docs/evaluation.md).

    python -m idefics_jax.eval --ckpt DIR --tokenizer DIR --task coco --data DIR --shots 0,4,8 --output OUT

`evaluate` (runner.py) is the one code path, called by the CLI and by the trainer; `tasks` says
which files each benchmark reads, `prompts` how prompts look, `demos` how demonstrations are chosen,
`metrics` the official scores.
"""

from idefics_jax.eval.runner import evaluate

__all__ = ["evaluate"]
