"""The one exception type of `mdsearch.data`."""

from __future__ import annotations

from collections.abc import Iterable

from ..config import closest


class DataError(ValueError):
    """Bad data or a bad data config: the message names the file or field and the reason."""


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest option, or '' when none is close."""
    close = closest(word, options)
    return f" (did you mean {close!r}?)" if close else ""
