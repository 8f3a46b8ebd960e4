"""Training-loop integrations (write side): record a run trained by someone else's loop.

* :class:`historystore.integrations.hf.HistoryCallback` for the Hugging Face
  ``transformers.Trainer`` (extra ``hf``),
* :class:`historystore.integrations.lightning.HistoryCallback` for Lightning's ``Trainer``
  (extra ``lightning``),
* :class:`IndexedDataset`: wraps any map-style dataset so that each item carries its index,
  which the callbacks record as the example id.

Both callbacks record through :class:`historystore.Recorder`, right after every optimizer step
(before the learning-rate scheduler moves), and close it when training ends. Importing this
package imports neither transformers nor lightning.
"""

from ._common import IndexedDataset

__all__ = ["IndexedDataset"]
