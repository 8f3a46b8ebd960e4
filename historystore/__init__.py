"""historystore: record a PyTorch model's entire training history, exactly and compactly."""

from ._version import __version__
from .config import RecorderConfig
from .errors import (
    CorruptStoreError,
    EncodingError,
    HistoryStoreError,
    MetadataError,
    ModelMismatchError,
    NotAStoreError,
    RecorderError,
    SchemaVersionError,
    StoreLockedError,
)
from .read.store import Batch, HistoryStore, StepBlock, open_store
from .write.recorder import Recorder

__all__ = [
    "Batch",
    "CorruptStoreError",
    "EncodingError",
    "HistoryStore",
    "HistoryStoreError",
    "MetadataError",
    "ModelMismatchError",
    "NotAStoreError",
    "Recorder",
    "RecorderConfig",
    "RecorderError",
    "SchemaVersionError",
    "StepBlock",
    "StoreLockedError",
    "__version__",
    "open_store",
]
