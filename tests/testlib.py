"""Helpers shared by test modules (a plain module, not conftest, so tests/multidevice — which has a
conftest of its own — can import it too)."""

import json
import os

from idefics_jax import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, *overrides: str):
    """`configs/<name>.py` through the loader the CLIs use, with "a.b=v" overrides."""
    return run_config.load(os.path.join(ROOT, "configs", f"{name}.py"), overrides)


def records(path) -> list[dict]:
    """The records of a metrics.jsonl."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def losses(workdir) -> dict[int, float]:
    """step → loss, the last record of each step (a resumed run re-logs the steps after its checkpoint)."""
    return {r["step"]: r["loss"] for r in records(os.path.join(workdir, "metrics.jsonl")) if "loss" in r}


def random_checkpoint(directory, seed: int = 0) -> None:
    """A converted-style checkpoint (step 0: params + config) of configs/tiny.py's model at random
    init (`seed`), as `tools/convert_weights.py` writes one: what `train.init_from` and `--ckpt` take."""
    import numpy as np
    from flax import nnx

    from idefics_jax.ckpt_format import ParamsWriter
    from idefics_jax.models import Idefics

    config = run_config.parse(run_config.load(os.path.join(ROOT, "configs", "tiny.py"))).model
    model = Idefics(config, rngs=nnx.Rngs(seed))
    writer = ParamsWriter(directory, 0)
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        writer.add(tuple(str(p) for p in path), np.asarray(v.get_value()))
    writer.finish({"model": config.to_dict()})
