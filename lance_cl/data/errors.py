"""Errors raised by the data loaders."""

from __future__ import annotations

__all__ = ["DatasetNotFoundError"]


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are not on disk; the message names every expected path and its source."""
