"""python -m idefics_jax.train --config configs/X.py [--workdir DIR] [--config.a.b=v ...] [--debug] [--verify_only]

Trains (or resumes: the latest complete checkpoint in WORKDIR/checkpoints) the configured model.
Process 0 writes WORKDIR/metrics.jsonl and TensorBoard events in WORKDIR/tensorboard. A wrong config
value, a missing file or a layout the devices cannot hold ends the run with one line and exit 1
(`--debug`: with the traceback).
"""

from __future__ import annotations

import logging
import os
import sys

from idefics_jax.errors import cli_main, quiet_start

quiet_start()

from absl import app, flags  # noqa: E402  (after quiet_start: it sets the log levels they read)

from idefics_jax import run_config  # noqa: E402

_CONFIG = run_config.define_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics). Default: config.workdir.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of input errors too.")
_VERIFY_ONLY = flags.DEFINE_bool(
    "verify_only",
    False,
    "Verify WORKDIR's checkpoints against their manifests, print a table, and exit (1: the newest is bad).",
)


def _train() -> None:
    from idefics_jax import distributed

    distributed.initialize()  # first: before anything touches the devices
    import jax

    from idefics_jax.errors import UserError
    from idefics_jax.train.loop import TrainingStopped, train

    logging.getLogger("absl").setLevel(logging.WARNING)
    config = _CONFIG.value
    if config is None:
        raise UserError("--config is required, e.g. --config configs/tiny.py")
    workdir = _WORKDIR.value or config.get("workdir")
    if not workdir:
        raise UserError("--workdir is required for this config (it sets no default)")
    if _VERIFY_ONLY.value:
        from idefics_jax.train.checkpointer import verify_report

        table, ok = verify_report(workdir)
        print(table, flush=True)
        sys.exit(0 if ok else 1)
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options are --config, --workdir, --config.a.b=v")
    cli_main("train", _train, _DEBUG.value)


if __name__ == "__main__":
    app.run(main)
