"""Where a ``--load-format secneuron`` load spends its time, in process (no vLLM server).

python -m benchmarks.profile_load [--preset qwen2-0.5b-shape] [--repeats 3] [--cprofile]
Locks the preset (three tasks, 10% each, as bench_load), then alternates: plain (each
tensor from safetensors' mmap copied into preallocated memory, as vLLM's default loader
does) and the one-copy loader, verified and not (read into that memory, hashed there, then
decrypt + detector per layer). Prints wall and process-CPU seconds per phase, best and range.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from benchmarks.bench_crypto import TASKS, random_selection
from harness.fixtures import fixture_model
from vllm_guard.secneuron.checkpoint import _ST_DTYPES
from vllm_guard.secneuron.keys import TaskKey
from vllm_guard.secneuron.lock import lock_checkpoint
from vllm_guard.secneuron.manifest import read_manifest
from vllm_guard.secneuron.open import OpenReport
from vllm_guard.secneuron.options import SecNeuronLoadConfig
from vllm_guard.secneuron.preflight import open_data_keys
from vllm_guard.secneuron.weights import load_in_place, open_shards


def _params(shards) -> dict[str, torch.Tensor]:
    """Fresh destination memory, as vLLM allocates its parameters before loading."""
    return {e.name: torch.empty(e.shape, dtype=e.dtype) for s in shards for e in s.entries}


def plain(model: Path) -> tuple[float, float]:
    with safe_open(model / "model.safetensors", framework="pt") as f:
        dest = {n: torch.empty(f.get_slice(n).get_shape(),
                               dtype=_ST_DTYPES[f.get_slice(n).get_dtype()])
                for n in f.keys()}  # noqa: SIM118
        w0, c0 = time.perf_counter(), time.process_time()
        for n in f.keys():  # noqa: SIM118
            dest[n].copy_(f.get_tensor(n))
    return time.perf_counter() - w0, time.process_time() - c0


def guarded(locked: Path, data_keys: dict, verify: bool) -> dict[str, float]:
    import vllm_guard.secneuron.weights as w

    manifest = read_manifest(locked)
    config = SecNeuronLoadConfig.from_extra({"verify_weights": verify, "allow_unsigned": True})
    shards = open_shards(locked, manifest)
    dest = _params(shards)
    stats = OpenReport([], [], [], 0, 0.0, {})
    phases: dict[str, float] = {}
    real = w.read_in_place

    def timed_read(*a, **k):
        w0, c0 = time.perf_counter(), time.process_time()
        out = real(*a, **k)
        phases["read+hash wall"] = time.perf_counter() - w0
        phases["read+hash cpu"] = time.process_time() - c0
        return out

    w.read_in_place = timed_read
    try:
        w0, c0 = time.perf_counter(), time.process_time()
        load_in_place(shards, manifest, data_keys, config, stats, dest)
        phases["total wall"] = time.perf_counter() - w0
        phases["total cpu"] = time.process_time() - c0
    finally:
        w.read_in_place = real
        for s in shards:
            s.close()
    phases["decrypt+detect wall"] = phases["total wall"] - phases["read+hash wall"]
    phases["decrypt+detect cpu"] = phases["total cpu"] - phases["read+hash cpu"]
    phases["decrypt seconds (summed over layers)"] = stats.seconds
    return phases


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="qwen2-0.5b-shape")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cprofile", action="store_true", help="also profile one verified load")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = fixture_model(args.preset)
    work = Path(tempfile.mkdtemp(prefix="profile-load-"))
    try:
        keys = {t: TaskKey.generate(t) for t in TASKS}
        lock_checkpoint(model, random_selection(model, 0.1), keys, work / "locked", None,
                        progress=False)
        data_keys = open_data_keys(read_manifest(work / "locked"), keys)
        rows: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            wall, cpu = plain(model)
            rows.setdefault("plain wall", []).append(wall)
            rows.setdefault("plain cpu", []).append(cpu)
            for verify in (True, False):
                for k, v in guarded(work / "locked", data_keys, verify).items():
                    rows.setdefault(f"{'verified' if verify else 'unverified'} {k}",
                                    []).append(v)
        for k, v in rows.items():
            print(f"{k:<52} best {min(v):6.3f} s  range {min(v):.3f}-{max(v):.3f}")
        if args.cprofile:
            prof = cProfile.Profile()
            prof.enable()
            guarded(work / "locked", data_keys, True)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
