"""Domain errors. Raised by the core; the service maps each class to one HTTP status in one place."""

from __future__ import annotations


class RetrievalError(Exception):
    """Base class of every error this project raises on purpose."""


class BadInput(RetrievalError, ValueError):
    """The caller gave something unusable (empty query, wrong type, bad parameter)."""


class BadQuery(BadInput):
    """A text query is empty, blank or too long."""


class BadImage(BadInput):
    """An image could not be decoded, is truncated, or is too large (decompression bomb)."""


class IndexNotFound(RetrievalError, FileNotFoundError):
    """No index folder (or a required file in it) at the given path."""


class IndexCorrupt(RetrievalError):
    """The index folder is present but inconsistent (row counts differ, unknown schema version...)."""


class IndexEncoderMismatch(RetrievalError):
    """The index was built with another encoder (or head) than the one asked to search it."""


class UnknownId(RetrievalError, KeyError):
    """No item with that id in the index."""


class EncoderUnavailable(RetrievalError):
    """The encoder's weights or libraries cannot be loaded (not installed, not downloadable, wrong path)."""


class DatasetError(RetrievalError):
    """A dataset or captions file cannot be read."""


class Overloaded(RetrievalError):
    """The request queue is full; the caller should retry later."""
