"""Training: state (state.py), the jitted step (step.py), checkpoints (checkpointer.py), metrics
(metrics.py), the loop (loop.py); `python -m idefics_jax.train` is the CLI (__main__.py)."""
