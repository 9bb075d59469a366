"""The one exception type of `mdsearch.data`."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DataError(ValueError):
    """Bad data or a bad data config: the message names the file or field and the reason."""


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest option, or '' when none is close."""
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
