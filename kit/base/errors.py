"""The kit's errors and the one way a script reports them.

    raise errors.DataError(f"cannot decode {path}: ...")      # a user-facing problem: one line, no traceback
    sys.exit(errors.run_cli(main, args))                      # every script's command line goes through this

Every problem a user can cause or fix is a KitError; its subclass says where it lies (settings, data, a model
file, a run that cannot go on, data preparation, export). `run_cli` turns any of them into one line on stderr and
exit 1, and a Ctrl-C into one line and exit 130 after checkpoint writes in flight have finished. Under torchrun a
settings error, which every rank meets, is said once (by rank 0); any other by its rank. Anything else is a bug
and keeps its traceback.
"""
import os
import signal
import sys
import threading

WRITER_THREAD = "checkpoint-writer"  # checkpoint.BackgroundWriter's threads: a Ctrl-C exit lets them finish


class KitError(Exception):
    """A user-facing problem, reported as one line."""


class ConfigError(KitError):
    """A bad preset name, key, value or flag."""


class DataError(KitError):
    """A data root, split list or image that cannot be used."""


class ModelError(KitError):
    """A weights file that cannot be loaded or does not fit."""


class TrainingError(KitError):
    """A run that cannot go on (too many non-finite losses, a checkpoint that cannot be written)."""


class PrepareError(KitError):
    """Data preparation (download.py) that cannot go on."""


class ExportError(KitError):
    """An export that fails or does not match the eager model."""


def exit_interrupted(message="interrupted", code=128 + signal.SIGINT):
    """Ctrl-C that should stop at once: let checkpoint writes in flight complete (a write takes well under a second),
    print one line, and skip interpreter teardown, where destroying a DALI pipeline interrupted inside a run aborts
    the process (std::terminate)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for thread in threading.enumerate():
        if thread.name == WRITER_THREAD:
            thread.join()
    print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_cli(main, *args, interrupted="interrupted"):
    """main(*args)'s exit code (None: 0); a KitError exits 1 with one line, a Ctrl-C with `interrupted`."""
    try:
        return main(*args) or 0
    except KitError as e:
        rank = int(os.environ.get("RANK", "0"))
        if rank != 0 and isinstance(e, ConfigError):  # every rank meets a settings error: rank 0 says it
            sys.exit(1)
        sys.exit(f"error: {e}" if rank == 0 else f"error (rank {rank}): {e}")
    except KeyboardInterrupt:
        exit_interrupted(interrupted)
