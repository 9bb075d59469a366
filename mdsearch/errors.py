"""The one base class of user-facing errors.

Every mistake a user can make (a malformed spec, recipe, space, dataset or checkpoint; a budget
nothing meets; a run directory in use) raises a subclass of `MdsearchError` whose message names
the file or field and what is expected. The CLI prints it as one line and exits with status 2
(`--debug` shows the traceback). Anything else that escapes is a bug in mdsearch.
"""

from __future__ import annotations

import difflib


class MdsearchError(ValueError):
    """Bad input, explained in one paragraph: the file or field, the reason, what to do."""


def closest(word: str, options) -> str | None:
    """The option closest to a mistyped `word`, or None when none is close."""
    match = difflib.get_close_matches(str(word), [str(o) for o in options], n=1)
    return match[0] if match else None


def did_you_mean(word: str, options) -> str:
    """'; did you mean 'x'?' for the closest option, else '; known: a, b, c'."""
    match = closest(word, options)
    return f"; did you mean {match!r}?" if match else f"; known: {', '.join(map(str, options))}"
