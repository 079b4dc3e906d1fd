"""The errors users see. A `JobError` is something the user can act on: every command prints it as
one line, `error: <message>`, and exits with its `exit_code`. Any other exception that reaches a
command's top is a bug: one line says so and where its traceback went (trainer/common/cli.py).
Each kind has its own subclass; a stage's own errors subclass one of them. Standard library only."""

from __future__ import annotations

LIMIT = 200  # characters of an exception's text in a one-line error


class JobError(Exception):
    """A problem the user can fix or should know of, said in one line; exit code 1."""
    exit_code = 1


class UsageError(JobError, ValueError):
    """A flag or setting that cannot work (argparse's exit code, 2): nothing has been done yet."""
    exit_code = 2


class InputError(JobError, ValueError):
    """A file, image, model or request body that is not what it should be."""


class StorageError(JobError, RuntimeError):
    """A place the run writes to cannot be written: the message names the flag, the path and why."""


class ClusterError(JobError, RuntimeError):
    """Ray cannot be reached, or the cluster cannot run the job as asked."""


class TrainingError(JobError, RuntimeError):
    """The training itself failed for good: Ray Train gave up after its restarts, or a checkpoint
    cannot be used."""


class StoreError(JobError, RuntimeError):
    """The model store cannot be read or changed as asked."""


class TrackingError(JobError):
    """Tracking was asked for and cannot be had (MLflow not installed, or no server named)."""


def first_line(exc: BaseException | str, named: bool = False, limit: int = LIMIT) -> str:
    """The first line of `exc`'s text (at most `limit` characters), or its type's name if it has
    none; `named` puts the type first ("OSError: ..."). A string stands for its own text."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return "" if isinstance(exc, str) else type(exc).__name__
    text = lines[0] if len(lines[0]) <= limit else lines[0][:limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if named and not isinstance(exc, str) else text


def interrupt(signum, frame):
    """A SIGTERM handler (`ray job stop`, systemd, Kubernetes): stop as Ctrl-C does, so the same
    cleanup runs (Ray shut down, checkpoints and the store's pointer left as they are)."""
    raise KeyboardInterrupt
