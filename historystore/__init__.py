"""historystore: record a PyTorch model's entire training history, exactly and compactly."""

from ._version import __version__
from .config import RecorderConfig
from .errors import (
    CorruptStoreError,
    EncodingError,
    HistoryStoreError,
    ModelMismatchError,
    NotAStoreError,
    RecorderError,
    SchemaVersionError,
)
from .read.store import Batch, HistoryStore, StepBlock, open_store
from .write.recorder import Recorder

__all__ = [
    "Batch",
    "CorruptStoreError",
    "EncodingError",
    "HistoryStore",
    "HistoryStoreError",
    "ModelMismatchError",
    "NotAStoreError",
    "Recorder",
    "RecorderConfig",
    "RecorderError",
    "SchemaVersionError",
    "StepBlock",
    "__version__",
    "open_store",
]
