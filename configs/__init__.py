"""Run configs: `get_config()` files for `python -m idefics_jax.train/plan --config configs/X.py`.

A package (installed with idefics_jax) so that config files share `configs.common` by import,
wherever they are loaded from.
"""
