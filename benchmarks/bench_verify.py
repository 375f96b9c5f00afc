"""Cost of checking a locked checkpoint against its signed digests (issue: signed content).

python -m benchmarks.bench_verify [--preset qwen2-0.5b-shape] [--shards 4] [--repeats 3]
Prints and writes benchmarks/results/verify.json:
- SHA-256 (whole files) and BLAKE3 (the signed weight blocks) throughput on one core and on
  all cores (threads, one buffer each: both drop the GIL), and read+hash of one shard in one
  pass against a plain read of it;
- the secneuron loader's weight stream (all keys, every tensor copied into a preallocated
  "parameter" as vLLM does) with ``verify_weights`` on and off, page cache warm: wall time
  and the process's CPU time (all threads) of one load.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.bench_crypto import TASKS, random_selection
from harness.fixtures import fixture_model
from harness.measure import print_result, timed, write_result
from vllm_guard.secneuron.checkpoint import load_checkpoint
from vllm_guard.secneuron.crypto import block_digest, read_hashed
from vllm_guard.secneuron.files import digest_files
from vllm_guard.secneuron.keys import TaskKey, generate_signing_key, load_signing_key, save_task_key
from vllm_guard.secneuron.lock import lock_checkpoint
from vllm_guard.secneuron.open import OpenReport
from vllm_guard.secneuron.preflight import open_data_keys

MB = 1 << 20


def sha256_gb_per_s(threads: int, size: int = 256 * MB) -> float:
    return _hash_gb_per_s(lambda b: hashlib.sha256(b).digest(), threads, size)


def blake3_gb_per_s(threads: int, size: int = 256 * MB) -> float:
    return _hash_gb_per_s(block_digest, threads, size)


def _hash_gb_per_s(fn, threads: int, size: int) -> float:
    bufs = [os.urandom(size) for _ in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        t = time.perf_counter()
        list(pool.map(fn, bufs))
        return threads * size / (time.perf_counter() - t) / 1e9


def resharded(model: Path, shards: int, out: Path) -> Path:
    """The model split into ``shards`` safetensors files of similar size (greedy by bytes)."""
    ckpt = load_checkpoint(model)
    files: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    sizes = [0] * shards
    for name, t in sorted(ckpt.tensors.items(), key=lambda kv: -kv[1].nbytes):
        i = sizes.index(min(sizes))
        files[i][name] = t
        sizes[i] += t.nbytes
    out.mkdir(parents=True)
    for i, tensors in enumerate(files):
        save_file(tensors, str(out / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"),
                  metadata={"format": "pt"})
    for p in model.iterdir():
        if p.is_file() and p.suffix != ".safetensors":
            shutil.copy2(p, out / p.name)
    return out


def stream_seconds(locked: Path, key_dir: Path, verify: bool, repeats: int
                   ) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of the best of ``repeats`` warm loads."""
    from vllm_guard.secneuron.keys import load_task_keys
    from vllm_guard.secneuron.options import SecNeuronLoadConfig
    from vllm_guard.secneuron.preflight import open_checkpoint
    from vllm_guard.secneuron.weights import stream_weights

    cfg = SecNeuronLoadConfig.from_extra({"key_dir": str(key_dir),
                                          "publisher_key": str(key_dir / "publisher.pub"),
                                          "verify_weights": verify}, env={})
    params: dict[str, torch.Tensor] = {}

    def load() -> None:
        manifest = open_checkpoint(locked, cfg)
        data_keys = open_data_keys(manifest, load_task_keys([key_dir]))
        stats = OpenReport([], [], [], 0, 0.0, {})
        with ExitStack() as stack:
            for name, t in stream_weights(locked, manifest, data_keys, cfg, stats, stack):
                if name not in params:
                    params[name] = torch.empty_like(t)
                params[name].copy_(t)  # what vLLM's weight_loader does

    load()  # warm: page cache, parameters allocated
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        load()
        best = min(best, (time.perf_counter() - t, time.process_time() - c))
    return best


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="qwen2-0.5b-shape")
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    cores = os.cpu_count() or 1
    result: dict = {"sha256_gb_per_s_one_core": sha256_gb_per_s(1),
                    f"sha256_gb_per_s_{cores}_threads": sha256_gb_per_s(cores),
                    "blake3_gb_per_s_one_core": blake3_gb_per_s(1),
                    f"blake3_gb_per_s_{cores}_threads": blake3_gb_per_s(cores)}
    work = Path(tempfile.mkdtemp(prefix="bench-verify-"))
    try:
        model = resharded(fixture_model(args.preset), args.shards, work / "plain")
        keys = {t: TaskKey.generate(t) for t in TASKS}
        for t, k in keys.items():
            save_task_key(k, work / "keys" / f"{t}.key")
        generate_signing_key(work / "keys" / "publisher.pem")
        lock_checkpoint(model, random_selection(model, args.fraction), keys, work / "locked",
                        load_signing_key(work / "keys" / "publisher.pem"), progress=False)
        locked = work / "locked"
        shards = sorted(locked.glob("*.safetensors"))
        total = sum(p.stat().st_size for p in shards)
        biggest = max(shards, key=lambda p: p.stat().st_size)

        def plain_read() -> None:
            with open(biggest, "rb", buffering=0) as f:
                buf = bytearray(biggest.stat().st_size)
                f.readinto(buf)

        plain_read()  # page cache warm
        read_s = timed(plain_read, args.repeats)[0]
        hashed_s = timed(lambda: read_hashed(biggest), args.repeats)[0]
        all_s = timed(lambda: digest_files(locked, [p.name for p in shards]), args.repeats)[0]
        off = stream_seconds(locked, work / "keys", False, args.repeats)
        on = stream_seconds(locked, work / "keys", True, args.repeats)
        result.update({
            "model": args.preset, "shards": len(shards), "weight_bytes": total, "cpus": cores,
            "read_one_shard_gb_per_s": biggest.stat().st_size / read_s / 1e9,
            "read_and_hash_one_shard_gb_per_s": biggest.stat().st_size / hashed_s / 1e9,
            "hash_all_shards_parallel_gb_per_s": total / all_s / 1e9,
            "stream_unverified_seconds": off[0], "stream_verified_seconds": on[0],
            "stream_unverified_cpu_seconds": off[1], "stream_verified_cpu_seconds": on[1],
            "verified_over_unverified": on[0] / off[0],
        })
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_result(result)
    write_result("verify", result)
    return result


if __name__ == "__main__":
    main()
