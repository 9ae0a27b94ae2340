"""The converter's error type: bad input reported as a message and exit status 2, no traceback."""
from __future__ import annotations


class ConvertError(ValueError):
    """A source or checkpoint the converter cannot use; the message names the file and the problem."""
