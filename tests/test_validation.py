"""Damaged metadata gets a clear error naming the file and field, never a crash; small bad
inputs on the store side get clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import historystore as hs
from attribution.cli import main
from benchmarks.faults import small_store
from historystore.encodings import EncodingRule
from historystore.encodings.policy import resolve
from historystore.errors import MetadataError
from historystore.meta.info import info
from historystore.meta.verify import verify

DELTA = "params/0.weight/delta/zarr.json"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return small_store(tmp_path_factory.mktemp("v") / "s.zarr", steps=12)


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "s.zarr"))


def _edit(path: Path, key: str, fn) -> None:
    f = path / key
    d = json.loads(f.read_text())
    fn(d)
    f.write_text(json.dumps(d))


def _refused(path: Path, key: str, field: str, match: str) -> MetadataError:
    """open_store raises MetadataError naming key and field; verify and the CLI give a verdict."""
    with pytest.raises(MetadataError, match=match) as e:
        hs.open_store(path)
    assert (e.value.key, e.value.field) == (key, field)
    assert str(path) in str(e.value)
    report = verify(str(path))
    assert not report.ok
    assert str(e.value) in report.problems[0], report.problems
    result = CliRunner().invoke(main, ["verify", "--no-progress", str(path)])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # a verdict, not an exception
    assert result.output.splitlines()[-1].startswith(f"FAILED {path}")  # the verdict comes last
    assert "Traceback" not in result.output
    info_result = CliRunner().invoke(main, ["info", str(path)])
    assert info_result.exit_code == 1 and "Error:" in info_result.output
    return e.value


def test_sound_store_passes(pristine):
    assert verify(str(pristine)).ok
    assert hs.open_store(pristine).num_steps == 12


def test_truncated_array_metadata(store):
    f = store / DELTA
    f.write_bytes(f.read_bytes()[:100])
    _refused(store, DELTA, "", "not valid JSON")


def test_object_dtype(store):
    _edit(store, DELTA, lambda d: d.update(data_type="object"))
    _refused(store, DELTA, "data_type", "'object' is not an allowed dtype")


def test_unknown_codec(store):
    _edit(store, DELTA, lambda d: d["codecs"].insert(1, {"name": "pickle"}))
    _refused(store, DELTA, "codecs[1].name", "codec 'pickle' is not allowed")


def test_tensor_shape_edited_in_root_attrs(store):
    _edit(
        store,
        "zarr.json",
        lambda d: d["attributes"]["historystore"]["tensors"][0].update(shape=[3, 3]),
    )
    rows = json.loads((store / DELTA).read_text())["shape"][0]
    assert rows == 32  # 12 steps in an array grown GROW_BLOCKS blocks of 4 steps at a time
    _refused(
        store,
        DELTA,
        "shape",
        r"\[32, 32, 64\] does not match the root attributes' row shape \[3, 3\]",
    )


def test_negative_schema_version(store):
    _edit(store, "zarr.json", lambda d: d["attributes"]["historystore"].update(schema_version=-5))
    e = _refused(
        store, "zarr.json", "attributes.historystore.schema_version", "-5 is not a schema version"
    )
    assert not isinstance(e, hs.SchemaVersionError)


def test_root_attributes_set_to_a_string(store):
    _edit(store, "zarr.json", lambda d: d.update(attributes="hello"))
    _refused(store, "zarr.json", "attributes", "expected an object, got str")


def test_root_attribute_types_are_checked(store):
    _edit(
        store,
        "zarr.json",
        lambda d: d["attributes"]["historystore"]["recorder"].update(steps_per_block="4"),
    )
    _refused(
        store,
        "zarr.json",
        "attributes.historystore.recorder.steps_per_block",
        "expected int, got str",
    )


def test_huge_array_shape_is_refused_before_any_allocation(store):
    _edit(store, "steps/loss/zarr.json", lambda d: d.update(shape=[10**15]))
    _refused(
        store,
        "steps/loss/zarr.json",
        "shape",
        "holds 1,000,000,000,000,000 rows but 12 are committed",
    )


def test_huge_commit_count_is_bounded_by_the_arrays(store):
    _edit(store, "commit/zarr.json", lambda d: d["attributes"].update(num_steps=10**15))
    _refused(store, DELTA, "shape", "holds 32 rows but 1000000000000000 are committed")


def test_huge_tensor_shape_everywhere_is_refused_by_memory(store):
    big = [10**8, 10**8]

    def root(d):
        d["attributes"]["historystore"]["tensors"][0]["shape"] = big

    _edit(store, "zarr.json", root)
    for a in ("delta", "keyframes"):
        key = f"params/0.weight/{a}/zarr.json"

        def arr(d, a=a):
            d["shape"] = [d["shape"][0], *big]
            d["chunk_grid"]["configuration"]["chunk_shape"] = [
                d["chunk_grid"]["configuration"]["chunk_shape"][0],
                *big,
            ]

        _edit(store, key, arr)
    _refused(store, DELTA, "chunk_grid.chunk_shape", "more than this machine's memory")


def test_missing_commit_field_is_not_read_as_zero(store):
    _edit(store, "commit/zarr.json", lambda d: d["attributes"].pop("num_steps"))
    _refused(store, "commit/zarr.json", "attributes.num_steps", "expected a count >= 0, got None")


def test_damaged_group_metadata(store):
    (store / "params" / "zarr.json").write_text('{"zarr_for')
    _refused(store, "params/zarr.json", "", "not valid JSON")


def test_tensor_name_cannot_leave_the_store(store):
    _edit(
        store,
        "zarr.json",
        lambda d: d["attributes"]["historystore"]["tensors"][0].update(name=".."),
    )
    _refused(
        store, "zarr.json", "attributes.historystore.tensors[0].name", "not a valid tensor name"
    )


def test_missing_chunk_file_of_a_scalar_is_found_on_open(store):
    shutil.rmtree(store / "steps" / "loss" / "c")
    with pytest.raises(MetadataError, match="chunk file '0' .* is missing"):
        hs.open_store(store)


# -- small store-side inputs -----------------------------------------------------------------
def test_negative_example_ids_are_refused_and_the_step_can_be_repeated(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with hs.Recorder(tmp_path / "n.zarr", model, opt) as rec:
        model(torch.ones(3, 4)).sum().backward()
        opt.step()
        with pytest.raises(ValueError, match="example_ids must be dataset indices >= 0, got -3"):
            rec.step([0, -3, 2])
        with pytest.raises(ValueError, match="ghost_ids must be dataset indices >= 0"):
            rec.step([0, 1, 2], ghost_ids=[-1])
        rec.step([0, 1, 2])
    s = hs.open_store(tmp_path / "n.zarr")
    assert s.num_steps == 1 and s.batch(0).ids.tolist() == [0, 1, 2]
    assert verify(str(tmp_path / "n.zarr")).ok


def test_malformed_ids_are_refused_and_ids_of_every_kind_are_stored(tmp_path):
    """Float, boolean and 2-D ids (torch or numpy) get a clear error and leave the step to
    be repeated; torch ids of other integer types, and numpy arrays or torch tensors the
    caller reuses afterwards, are stored as given at the call."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reused = np.array([7, 8, 9])
    with hs.Recorder(tmp_path / "ids.zarr", model, opt) as rec:
        for ids in (
            torch.tensor([0.0, 1.0]),
            torch.ones(2, dtype=torch.bool),
            torch.zeros(2, 2, dtype=torch.long),
            np.zeros((2, 2), dtype=np.int64),
        ):
            model(torch.ones(3, 4)).sum().backward()
            opt.step()
            with pytest.raises(ValueError, match="example_ids must be a 1-D sequence of integers"):
                rec.step(ids)
            with pytest.raises(ValueError, match="labels must be a 1-D sequence of integers"):
                rec.step([0, 1], labels=ids)
            rec.step(torch.tensor([3, 4], dtype=torch.int32), labels=torch.tensor([1, 0]))
        model(torch.ones(3, 4)).sum().backward()
        opt.step()
        rec.step(reused, labels=[2, 2, 2])
        reused[:] = -1  # the caller's array, reused after the call
        ids_buf, labels_buf = torch.tensor([5, 6]), torch.tensor([1, 1])
        model(torch.ones(3, 4)).sum().backward()
        opt.step()
        rec.step(ids_buf, labels=labels_buf)
        ids_buf.fill_(-1)  # the same for torch tensors (e.g. a loader's reused buffer)
        labels_buf.fill_(-1)
    s = hs.open_store(tmp_path / "ids.zarr")
    assert s.num_steps == 6
    assert [s.batch(t).ids.tolist() for t in range(6)] == [[3, 4]] * 4 + [[7, 8, 9], [5, 6]]
    assert s.batch(0).labels.tolist() == [1, 0] and s.batch(4).labels.tolist() == [2, 2, 2]
    assert s.batch(5).labels.tolist() == [1, 1]
    assert verify(str(tmp_path / "ids.zarr")).ok


def test_reason_for_a_bias_under_plain_sgd_names_the_bias():
    module = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    rule = EncodingRule("lowrank", {"max_rows": 4})
    enc, _, why = resolve((rule,), "fc.bias", module.bias, module, opt)
    assert enc == "full" and "'fc.bias' is not one (a bias has no factors)" in why
    assert "under plain SGD" not in why
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    _, _, why = resolve((rule,), "fc.weight", module.weight, module, opt)
    assert "factors need plain SGD (no momentum, weight decay or maximize)" in why


def test_force_keeps_factors_larger_than_full_and_info_says_so(tmp_path, digits):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # 32 rows x (64 + 10) factors = 2368 values > 640 dense: kept full unless forced
    plain = EncodingRule("lowrank", {"max_rows": 32})
    assert resolve((plain,), "1.weight", model[1].weight, model[1], opt)[0] == "full"
    forced = EncodingRule("lowrank", {"max_rows": 32, "force": True})
    enc, params, why = resolve((forced,), "1.weight", model[1].weight, model[1], opt)
    assert enc == "factors" and "force" not in params and "forced" in why
    cfg = hs.RecorderConfig(encodings=(forced,), keyframe_every=4)
    with hs.Recorder(tmp_path / "f.zarr", model, opt, cfg) as rec:
        for t in range(3):
            idx = torch.arange(32 * t, 32 * t + 32)
            loss = torch.nn.functional.cross_entropy(
                model(digits.x_train[idx]), digits.y_train[idx]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(idx, loss=loss)
    t = {d["name"]: d for d in info(str(tmp_path / "f.zarr"))["tensors"]}["1.weight"]
    assert t["encoding"] == "factors" and "forced" in t["encoding_reason"]
    assert t["delta_rel_error_max"] < 1e-5  # exact to the float sum
    result = CliRunner().invoke(main, ["info", str(tmp_path / "f.zarr")])
    assert "forced, even if larger than full" in result.output


def test_hyperparameters_are_read_every_step_and_a_changed_group_is_refused(tmp_path):
    """Per-step hyperparameters follow the optimizer: a schedule's lr, a tuple (betas) changed
    in place, an lr that becomes a 1-element tensor; a param group added during recording
    gets a clear error (the steps before it stay in the store)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model[0].parameters(), lr=0.1, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    path = tmp_path / "hp.zarr"
    with (
        pytest.raises(hs.RecorderError, match="param groups changed"),
        hs.Recorder(path, model, opt) as rec,
    ):
        for t in range(6):
            model(torch.ones(3, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
            if t == 5:
                opt.add_param_group({"params": list(model[1].parameters())})
            rec.step([t])
            sched.step()
            if t == 1:
                opt.param_groups[0]["betas"] = (0.8, 0.95)
            if t == 3:
                opt.param_groups[0]["lr"] = torch.tensor(0.02)
    s = hs.open_store(path)
    assert s.num_steps == 5
    np.testing.assert_allclose(
        s.hparam("g0.lr"), [0.1, 0.05, 0.025, 0.0125, 0.02], rtol=0, atol=1e-9
    )
    assert s.hparam("g0.betas.0").tolist() == pytest.approx([0.9, 0.9, 0.8, 0.8, 0.8])
    assert s.hparam("g0.betas.1").tolist() == pytest.approx([0.99, 0.99, 0.95, 0.95, 0.95])
    assert verify(str(path)).ok
