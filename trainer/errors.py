"""What every command's one-line errors share: an exception's first line, and SIGTERM as Ctrl-C.
Standard library only."""

from __future__ import annotations

LIMIT = 200  # characters of an exception's text in a one-line error


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
