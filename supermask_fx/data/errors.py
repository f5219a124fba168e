"""Exceptions raised by :mod:`supermask_fx.data`."""

from __future__ import annotations

__all__ = ["DatasetFormatError", "DatasetNotFoundError"]


class DatasetNotFoundError(FileNotFoundError):
    """No local copy of a data set was found (and downloading was disabled or failed).

    The message names the data set, every place searched, the expected files/layout and how to obtain them.
    """


class DatasetFormatError(ValueError):
    """A data file or folder exists but is malformed (bad IDX magic, truncated data, count mismatch, missing
    class folder, wrong image size, ...). The message names the offending file and what is wrong."""
