"""Fault injection: random SIGKILLs, a full disk, two writers, and mutated metadata.

    python -m benchmarks.faults            # 20 kills, 500 mutated stores -> results/faults.json
    python -m benchmarks.faults --quick    # 3 kills, 50 mutated stores (what CI runs as tests)

* kills: a subprocess records a deterministic run (MLP, generated data, AdamW, 4-step blocks) and is
  killed with SIGKILL at a random time; then ``verify`` must pass, a resume (restore the model
  and optimizer from the store, continue) must reach the last step, and the replayed final
  weights must equal both the resumed model's and those of an uninterrupted reference run bit
  for bit.
* disk full: the store lives on a tiny tmpfs (where ``mount`` is allowed, else every store
  write past a budget fails with ENOSPC); the training loop gets the error, ``verify`` passes
  on what was committed, and after the disk grows a resume finishes the run bit-exactly.
* two writers: while a subprocess records, ``overwrite=True`` and ``resume=True`` writers must
  fail with ``StoreLockedError`` naming the subprocess's pid; the store verifies afterwards.
* metadata fuzzer: one ``zarr.json`` of a small store is mutated (truncated, a value replaced
  by another type, a huge or negative number, a key removed); ``verify`` must end in a verdict
  (no exception, no "unexpected" problem), within a time bound and without a large allocation.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import historystore as hs
from historystore.errors import HistoryStoreError, StoreLockedError
from historystore.meta.verify import verify

STEPS = 32
SPB = 4
CONFIG = dict(keyframe_every=8, steps_per_block=SPB)
BATCH = 32


# -- a deterministic run -----------------------------------------------------------------------
@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread: the same float sums in every process (bit-exact comparisons)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """Generated data (no scikit-learn import: the killed subprocesses start faster)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    return x, (x @ torch.randn(64, 10, generator=g)).argmax(1)


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)


def train(
    path: str | os.PathLike[str],
    steps: int = STEPS,
    *,
    resume: bool = False,
    pace: float = 0.0,
    on_ready: Any = None,
) -> dict[str, torch.Tensor]:
    """Record ``steps`` steps (resume: from the store's last step); batch t depends on t only."""
    x, y = _data()
    model, opt = _model()
    with one_thread():
        start = 0
        if resume:
            store = hs.open_store(path)
            store.restore(model, opt)
            start = store.num_steps
        cfg = hs.RecorderConfig(**CONFIG)
        with hs.Recorder(path, model, opt, cfg, resume=resume) as rec:
            if on_ready is not None:
                on_ready()
            for t in range(start, steps):
                idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(1000 + t))
                idx = idx[:BATCH]
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                rec.step(idx, labels=y[idx], loss=loss)
                if pace:
                    time.sleep(pace)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def bits_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(
        torch.equal(a[n].view(torch.int32), b[n].view(torch.int32)) for n in a
    )


def spawn_writer(path: Path, steps: int, pace: float) -> subprocess.Popen[str]:
    """A recording subprocess; returns once it has committed θ_0."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.faults", "--worker", str(path), str(steps), str(pace)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    commit = path / "commit" / "zarr.json"
    deadline = time.time() + 60
    while line.strip() == "ready" and time.time() < deadline:  # θ_0 is committed in background
        with contextlib.suppress(OSError, ValueError):
            if json.loads(commit.read_text())["attributes"].get("num_keyframes", 0) >= 1:
                return proc
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"the recording subprocess did not start (said {line!r})")


# -- kills -----------------------------------------------------------------------------------
def kills(workdir: Path, n: int, seed: int = 0, reference: dict | None = None) -> dict[str, Any]:
    """``n`` random SIGKILLs, each followed by verify, a resume and a bit-exact comparison."""
    rng = random.Random(seed)
    reference = reference or train(workdir / "reference.zarr")
    out: list[dict[str, Any]] = []
    pace = 0.02
    for i in range(n):
        path = workdir / f"kill{i}.zarr"
        proc = spawn_writer(path, STEPS, pace)
        delay = rng.uniform(0.0, STEPS * pace)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = proc.returncode == -signal.SIGKILL
        rep = verify(str(path))
        committed = rep.num_steps
        resumed = train(path, resume=True)
        store = hs.open_store(path)
        final = store.params_at(STEPS)
        rep2 = verify(str(path))
        out.append(
            {
                "delay_s": round(delay, 3),
                "killed": killed,
                "committed_steps": committed,
                "verify_after_kill": rep.ok,
                "problems": rep.problems,
                "bit_exact": bits_equal(final, resumed) and bits_equal(final, reference),
                "verify_after_resume": rep2.ok and not rep2.notes,
            }
        )
    good = [
        r
        for r in out
        if r["verify_after_kill"] and r["bit_exact"] and r["verify_after_resume"] and r["killed"]
    ]
    return {"kills": len(out), "sound_bit_exact_resumes": len(good), "runs": out}


# -- a full disk -----------------------------------------------------------------------------
@contextlib.contextmanager
def tiny_disk(where: Path, size_kb: int, mount: bool = True) -> Iterator[tuple[Path, Any]]:
    """A ``size_kb`` tmpfs (root and mount allowed) or ENOSPC simulated in the file writes
    (zarr's LocalStore and the recorder's direct chunk files).

    Yields (directory, grow): ``grow()`` gives the disk room again."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = False
    if mount and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount"):
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)],
            capture_output=True,
        )
        mounted = r.returncode == 0
    if mounted:

        def grow() -> None:
            subprocess.run(
                ["mount", "-o", "remount,size=64m", str(where)], check=True, capture_output=True
            )

        try:
            yield where, grow
        finally:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
        return
    import zarr.storage._local as local

    from historystore.write import chunks

    real_put, real_write = local._put, chunks.write_bytes
    budget = {"bytes": size_kb * 1024 * 2 // 5}  # tmpfs also spends a 4 KiB page per file

    def spend(path: Any, n: int) -> None:
        if budget["bytes"] - n < 0 and str(path).startswith(str(where)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        budget["bytes"] -= n

    def put(path: Any, value: Any, exclusive: bool = False) -> Any:
        spend(path, len(value.as_buffer_like()) if hasattr(value, "as_buffer_like") else 0)
        return real_put(path, value, exclusive)

    def write(path: str, data: Any) -> None:  # the writer's direct chunk files
        spend(path, memoryview(data).nbytes)
        real_write(path, data)

    def grow_sim() -> None:
        budget["bytes"] = 1 << 40

    local._put, chunks.write_bytes = put, write
    try:
        yield where, grow_sim
    finally:
        local._put, chunks.write_bytes = real_put, real_write


def disk_full(
    workdir: Path, reference: dict | None = None, size_kb: int = 1536, mount: bool = True
) -> dict[str, Any]:
    """Fill a tiny disk while recording; check the committed steps, then resume on more room."""
    reference = reference or train(workdir / "reference.zarr")
    with tiny_disk(workdir / "tiny", size_kb, mount) as (disk, grow):
        path = disk / "full.zarr"
        error = ""
        try:
            train(path)
        except (HistoryStoreError, OSError) as e:
            error = str(e)
        rep = verify(str(path))
        committed = rep.num_steps
        grow()
        resumed = train(path, resume=True)
        final = hs.open_store(path).params_at(STEPS)
        rep2 = verify(str(path))
        return {
            "tmpfs": os.path.ismount(disk),
            "error": error[:300],
            "no_space_error": "No space left" in error or "ENOSPC" in error or "28" in error,
            "committed_steps": committed,
            "verify_after_full": rep.ok,
            "bit_exact_after_resume": bits_equal(final, resumed) and bits_equal(final, reference),
            "verify_after_resume": rep2.ok,
        }


# -- two writers -----------------------------------------------------------------------------
def two_writers(workdir: Path) -> dict[str, Any]:
    path = workdir / "two.zarr"
    proc = spawn_writer(path, 10_000, 0.01)
    refused: dict[str, str] = {}
    try:
        model, opt = _model()
        for mode in ("overwrite", "resume"):
            try:
                with hs.Recorder(path, model, opt, **{mode: True}):
                    pass
            except StoreLockedError as e:
                if e.holder.get("pid") == proc.pid:
                    refused[mode] = str(e)
            except HistoryStoreError as e:  # a resume refused for another reason: a failure
                refused.pop(mode, None)
                print(f"{mode}: {e!r}", file=sys.stderr)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    rep = verify(str(path))
    return {
        "second_writers_refused": len(refused),
        "second_writers_tried": 2,
        "message": refused.get("overwrite", ""),
        "verify_after": rep.ok,
        "problems": rep.problems,
        "steps": rep.num_steps,
    }


# -- metadata fuzzer -------------------------------------------------------------------------
MUTATIONS = ("truncate", "set", "delete", "garbage")
SPECIAL_VALUES: list[Any] = [
    -5,
    -1,
    0,
    3,
    10**15,
    2**63,
    1.5,
    float("nan"),
    "",
    "object",
    "zstd",
    "sharding_indexed",
    "../x",
    None,
    True,
    [],
    [3, 3],
    [10**15],
    [10**15, 10**15],
    {},
    {"name": "pickle"},
]


def json_files(store: Path) -> list[Path]:
    return sorted(store.rglob("zarr.json"))


def _nodes(doc: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """(container, key) of every value in a JSON document, depth first."""
    items = (
        doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    )
    for k, v in items:
        out.append((doc, k))
        _nodes(v, out)
    return out


def mutate(raw: bytes, kind: str, pick: int, value: Any) -> bytes:
    """One mutation of a ``zarr.json``'s bytes (``pick`` chooses the place)."""
    if kind == "truncate":
        return raw[: pick % max(1, len(raw))]
    if kind == "garbage":
        return bytes((pick + i * 7) % 256 for i in range(1 + pick % 64))
    doc = json.loads(raw)
    if kind == "delete":
        keys = [(c, k) for c, k in _nodes(doc, []) if isinstance(c, dict)]
        if keys:
            c, k = keys[pick % len(keys)]
            del c[k]
        return json.dumps(doc).encode()
    nodes = _nodes(doc, [])
    if not nodes:
        return json.dumps(value).encode()
    c, k = nodes[pick % len(nodes)]
    c[k] = value
    return json.dumps(doc).encode()


def check_verdict(store: Path, max_seconds: float = 20.0, max_rss_mb: float = 1024) -> dict:
    """verify + open_store on a (mutated) store: a verdict, no crash, bounded time and memory."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    crash = ""
    try:
        rep = verify(str(store))
        ok, problems = rep.ok, rep.problems
    except Exception as e:  # verify must never raise
        ok, problems, crash = False, [], f"verify raised {e!r}"
    if any(p.startswith("unexpected ") for p in problems):
        crash = problems[0]
    try:
        hs.open_store(store)
    except HistoryStoreError:
        pass
    except Exception as e:
        crash = crash or f"open_store raised {e!r}"
    seconds = time.perf_counter() - t0
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    if seconds > max_seconds:
        crash = crash or f"took {seconds:.1f} s"
    if rss_growth > max_rss_mb:
        crash = crash or f"peak memory grew by {rss_growth:.0f} MB"
    return {"ok": ok, "problem": problems[0] if problems else "", "crash": crash, "s": seconds}


def small_store(path: Path, steps: int = 12) -> Path:
    train(path, steps)
    return path


def fuzz(store: Path, n: int, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    files = json_files(store)
    results = []
    for _ in range(n):
        f = files[rng.randrange(len(files))]
        raw = f.read_bytes()
        kind = rng.choice(MUTATIONS)
        pick = rng.randrange(1 << 30)
        value = rng.choice(SPECIAL_VALUES)
        try:
            f.write_bytes(mutate(raw, kind, pick, value))
            r = check_verdict(store)
        finally:
            f.write_bytes(raw)
        results.append({"file": str(f.relative_to(store)), "mutation": kind, **r})
    crashes = [r for r in results if r["crash"]]
    return {
        "mutated_stores": len(results),
        "verdicts": len(results) - len(crashes),
        "crashes": len(crashes),
        "rejected": sum(not r["ok"] for r in results),
        "accepted_harmless": sum(r["ok"] for r in results),
        "max_seconds": max((r["s"] for r in results), default=0.0),
        "crash_examples": crashes[:5],
        "zarr_json_files": len(files),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        path, steps, pace = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
        train(path, steps, pace=pace, on_ready=lambda: print("ready", flush=True))
        return
    from ._machine import arg_parser, machine_facts, plain_json, results_dir

    # each resume after a kill warns that it takes over the killed writer's lock: expected here
    warnings.filterwarnings("ignore", "(?s).*ended without closing the recorder", RuntimeWarning)

    ap = arg_parser(__doc__, "", "3 kills and 50 mutated stores", "faults.json")
    ap.add_argument("--kills", type=int, default=None)
    ap.add_argument("--fuzz", type=int, default=None)
    args = ap.parse_args()
    n_kills = args.kills or (3 if args.quick else 20)
    n_fuzz = args.fuzz or (50 if args.quick else 500)
    out_path = args.out or results_dir(args.quick) / "faults.json"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        reference = train(work / "reference.zarr")
        t0 = time.perf_counter()
        k = kills(work, n_kills, reference=reference)
        print(
            f"kills: {k['kills']} SIGKILLs, {k['sound_bit_exact_resumes']} sound bit-exact resumes"
        )
        d = disk_full(work, reference=reference)
        print(
            f"disk full ({'tmpfs' if d['tmpfs'] else 'simulated ENOSPC'}): error reached the loop: "
            f"{d['no_space_error']}, {d['committed_steps']} steps committed, verify "
            f"{'OK' if d['verify_after_full'] else 'FAILED'}, resume bit-exact: "
            f"{d['bit_exact_after_resume']}"
        )
        w = two_writers(work)
        print(
            f"two writers: {w['second_writers_refused']} of {w['second_writers_tried']} second "
            f"writers refused, store verifies: {w['verify_after']}"
        )
        z = fuzz(small_store(work / "fuzz.zarr"), n_fuzz)
        print(
            f"fuzzer: {z['mutated_stores']} mutated stores, {z['verdicts']} verdicts, "
            f"{z['crashes']} crashes ({z['rejected']} rejected, {z['accepted_harmless']} "
            f"harmless edits accepted; slowest {z['max_seconds']:.2f} s)"
        )
        result = {
            "machine": machine_facts() if not args.quick else {},
            "seconds": time.perf_counter() - t0,
            "kills": k,
            "disk_full": d,
            "two_writers": w,
            "fuzz": z,
        }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(plain_json(result), indent=1))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
