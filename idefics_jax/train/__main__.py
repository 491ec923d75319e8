"""python -m idefics_jax.train --config configs/X.py [--workdir DIR] [--config.a.b=v ...]

Trains (or resumes: the latest complete checkpoint in WORKDIR/checkpoints) the configured model.
Process 0 writes WORKDIR/metrics.jsonl and TensorBoard events in WORKDIR/tensorboard.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics). Default: config.workdir.")


def main(argv):
    del argv
    from idefics_jax import distributed

    distributed.initialize()  # first: before anything touches the devices
    import jax

    from idefics_jax.train.loop import TrainingStopped, train

    logging.getLogger("absl").setLevel(logging.WARNING)
    config = _CONFIG.value
    if config is None:
        sys.exit("--config is required, e.g. --config configs/tiny.py")
    workdir = _WORKDIR.value or config.get("workdir")
    if not workdir:
        sys.exit("--workdir is required for this config (it sets no default)")
    if jax.process_index() == 0:
        note = "" if _WORKDIR.value else " (the config's default; set --workdir to change)"
        print(f"workdir: {os.path.abspath(workdir)}{note}", file=sys.stderr, flush=True)
    try:
        summary = train(config, workdir)
    except TrainingStopped as e:
        sys.exit(f"training stopped: {e}")
    if jax.process_index() == 0:
        print(
            f"done: step {summary['final_step']}, loss {summary['last_loss']}, checkpoints {summary['checkpoints']}",
            file=sys.stderr,
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)
