"""The one progress channel: library functions take `progress`, a function of one line of text
(None: silent), and the CLI passes `say` (or `prefixed(name)`), which writes the line to stderr
at once. Results go to stdout; progress never does. (Library diagnostics, such as a cache hit,
go to Python's `logging` at INFO, off by default.)"""

from __future__ import annotations

import sys
from typing import Callable


def say(message: str) -> None:
    """One progress line on stderr, flushed."""
    print(message, file=sys.stderr, flush=True)


def prefixed(name: str) -> Callable[[str], None]:
    """`say` with a `[name] ` prefix (a run's or a command's lines in a mixed log)."""
    return lambda message: say(f"[{name}] {message}")


def quiet(message: str) -> None:
    """The channel of a caller that asked for no progress."""
