"""Errors that are the user's, and how every command-line entry point reports them.

`UserError` (a ValueError) is raised for problems with what the user gave: a config field, a file,
a checkpoint, the devices. Every CLI runs its body through `cli_main`: a UserError becomes one line
on stderr and exit code 1 (usage errors are argparse's/absl's: exit 2), with the traceback only
under `--debug`; anything else is a bug of ours and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any


class UserError(ValueError):
    """A problem with the user's input; the message names the thing that is wrong and what was expected."""


def cli_main(prog: str, body: Callable[[], Any], debug: bool = False) -> Any:
    """Runs `body()`; a UserError (or KeyboardInterrupt) exits with one line instead of a traceback."""
    try:
        return body()
    except UserError as e:
        if debug:
            raise
        message = " ".join(str(e).split())
        print(f"{prog}: error: {message} (--debug shows the traceback)", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


def quiet_start() -> None:
    """Silences third-party start-up noise before our first line: transformers' "PyTorch was not
    found" notice, TensorFlow/XLA C++ INFO logs and JAX's 'Unable to initialize backend' INFO lines.
    Warnings and errors still show. Call before importing transformers or JAX."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging

    from absl import logging as absl_logging

    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    absl_logging.get_absl_handler().addFilter(_drop_known_noise)
    logging.getLogger("absl").addFilter(_drop_known_noise)  # when absl.app is not running (argparse CLIs)
    sys.unraisablehook = _without_late_loop_callbacks(sys.unraisablehook)


def _without_late_loop_callbacks(previous: Callable) -> Callable:
    """After an asynchronous checkpoint save fails, TensorStore's threads keep completing writes and
    call back into Orbax's event loop, already closed: each callback's "RuntimeError: Event loop is
    closed" is printed as an unraisable exception — dozens of tracebacks around the one line that
    says what failed. Only that exception, raised by asyncio's call_soon_threadsafe, is dropped."""

    def hook(unraisable):
        frames, tb = [], unraisable.exc_traceback
        while tb is not None:
            frames.append(tb.tb_frame.f_code.co_name)
            tb = tb.tb_next
        late = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
        if not (late and "call_soon_threadsafe" in frames):
            previous(unraisable)

    return hook


# Messages third-party libraries log at warning level about things we do on purpose.
_NOISE = (
    "read_only=True, setting save_interval_steps",  # Orbax, opening a checkpoint to read it
    "Given directory is read only",
    "was found in the checkpoint, but could not be restored",  # Orbax, when we read only some items of a step
)


def _drop_known_noise(record) -> bool:
    # Orbax's background save threads log their failures (with tracebacks) before re-raising them to
    # the trainer, which reports them in one line (train/checkpointer.py CheckpointSaveError).
    if record.levelno >= 40 and f"{os.sep}orbax{os.sep}" in record.pathname:
        return False
    message = record.getMessage()
    return not any(n in message for n in _NOISE)
