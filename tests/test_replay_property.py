"""Property: replay is bit-exact for any float sequence (±0, subnormals, inf, NaN, any scale)."""

from __future__ import annotations

import tempfile

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import historystore as hs


class SetTo(torch.optim.Optimizer):
    """A custom optimizer (not from torch.optim) that jumps to given weights each step."""

    def __init__(self, params, targets: list[np.ndarray]) -> None:
        super().__init__(params, {"lr": 1.0})
        self.targets = iter(targets)

    @torch.no_grad()
    def step(self, closure=None):
        p = self.param_groups[0]["params"][0]
        p.copy_(torch.from_numpy(next(self.targets)))
        self.state[p]["visits"] = self.state[p].get("visits", 0) + 1


floats = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
sequences = st.integers(1, 12).flatmap(
    lambda n: st.lists(arrays(np.float32, (7,), elements=floats), min_size=n, max_size=n)
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(start=arrays(np.float32, (7,), elements=floats), targets=sequences)
def test_replay_is_bit_exact_for_any_values(start: np.ndarray, targets: list[np.ndarray]) -> None:
    model = torch.nn.Linear(7, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(start).view(1, 7))
    opt = SetTo(model.parameters(), [t.reshape(1, 7) for t in targets])
    with tempfile.TemporaryDirectory() as d:
        cfg = hs.RecorderConfig(keyframe_every=4, steps_per_block=2)
        with hs.Recorder(f"{d}/p.zarr", model, opt, cfg) as rec:
            for i in range(len(targets)):
                opt.step()
                rec.step([i])
        store = hs.open_store(f"{d}/p.zarr")
        expected = [start, *targets]
        for t in range(len(targets) + 1):
            got = store.params_at(t)["weight"].numpy().reshape(7)
            np.testing.assert_array_equal(got.view(np.int32), expected[t].view(np.int32))
        assert store.optimizer_state(len(targets) - 1)["weight"]["visits"].item() == len(targets)
