"""Exceptions raised by historystore.

Every error a user can trigger derives from :class:`HistoryStoreError`, so callers can catch
one type; the subclasses say *what* is wrong so that the message can say how to fix it.
"""

from __future__ import annotations


class HistoryStoreError(Exception):
    """Base class of all historystore errors."""


class NotAStoreError(HistoryStoreError):
    """The path does not hold a historystore (missing, not a zarr group, or foreign attributes)."""


class SchemaVersionError(HistoryStoreError):
    """The store was written by a newer schema than this library understands."""


class ModelMismatchError(HistoryStoreError):
    """A model or optimizer does not match the tensors recorded in the store."""


class CorruptStoreError(HistoryStoreError):
    """Stored data fails a checksum, is missing, or contradicts the store's metadata."""


class RecorderError(HistoryStoreError):
    """The recorder was used incorrectly or its background writer failed."""


class EncodingError(HistoryStoreError):
    """An encoding cannot provide what was asked of it (e.g. a dense delta from a sketch)."""


class MetadataError(CorruptStoreError):
    """A store's metadata (a ``zarr.json`` or the root attributes) is unreadable or contradicts
    the layout; ``key`` names the file and ``field`` the entry at fault."""

    def __init__(self, message: str, key: str = "", field: str = "") -> None:
        super().__init__(message)
        self.key = key
        self.field = field


class StoreLockedError(RecorderError):
    """Another writer holds the store; ``holder`` says who (pid, host, since)."""

    def __init__(self, message: str, holder: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.holder = dict(holder or {})
