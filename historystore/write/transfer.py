"""Device→host copies of the recorder's rows without stalling training.

On CPU a copy is a plain (batched) ``torch._foreach_copy_``. On CUDA the rows are pinned host
memory and the copies run on a side stream that first waits for the training stream, so the
training stream never waits for a device→host transfer and no ``.cpu()`` synchronises per
tensor. Sources that training will overwrite (optimizer state) are first snapshotted on the
device (a device copy is ~100× faster than the transfer); every source is kept alive for the
side stream with ``record_stream``. :meth:`HostCopier.synchronize` is called once per block,
before the writer reads the rows.
"""

from __future__ import annotations

import torch


class HostCopier:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending = False

    def copy(self, dst: list[torch.Tensor], srcs: list[torch.Tensor], snapshot: bool) -> None:
        """``dst[i] <- srcs[i]``; ``snapshot`` when training may modify a source later."""
        if not dst:
            return
        if self._side is None:
            torch._foreach_copy_(dst, srcs)
            return
        if snapshot:
            srcs = [s.detach().clone() for s in srcs]
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side):
            torch._foreach_copy_(dst, srcs, non_blocking=True)
        for s in srcs:
            s.record_stream(self._side)
        self._pending = True

    def synchronize(self) -> None:
        """Wait until every copy issued so far is on the host."""
        if self._side is not None and self._pending:
            self._side.synchronize()
            self._pending = False
