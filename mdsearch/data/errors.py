"""The one exception type of `mdsearch.data`."""

from __future__ import annotations

from ..errors import MdsearchError


class DataError(MdsearchError):
    """Bad data or a bad data config: the message names the file or field and the reason."""
