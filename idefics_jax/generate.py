"""`python -m idefics_jax.generate ...`: the generation command line (idefics_jax/generation/cli.py).

`idefics_jax.generate` is also the package's generate function (`idefics_jax.generation.generate`).
Importing this module by name (`import idefics_jax.generate`; `python -m` does not) makes Python
bind the package attribute to the module instead of the function, so the module is made callable:
calling it calls the function, and `idefics_jax.generate(model, ...)` works either way.
"""

from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from idefics_jax.generation import generate

        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    from idefics_jax.generation.cli import run

    run()
