"""Few-shot evaluation with the Flamingo / IDEFICS protocol (docs/evaluation.md).

    python -m idefics_jax.eval --ckpt DIR --tokenizer DIR --task coco --data DIR --shots 0,4,8 --output OUT

`evaluate` (runner.py) is the one code path, called by the CLI and by the trainer; `tasks` says
which files each benchmark reads, `prompts` how prompts look, `demos` how demonstrations are chosen,
`metrics` the official scores. JAX is imported on first use of `evaluate`, so that the config
validation (which reads the task names) stays light.
"""


def __getattr__(name: str):
    if name == "evaluate":
        from idefics_jax.eval.runner import evaluate

        return evaluate
    raise AttributeError(f"module 'idefics_jax.eval' has no attribute {name!r}")


__all__ = ["evaluate"]
