"""Lock/unlock throughput on a realistic-shape model (issue: SecNeuron toolchain).

python -m benchmarks.bench_crypto [--preset qwen2-0.5b-shape] [--fraction 0.1]
Prints and writes benchmarks/results/crypto.json, per AEAD chunk size: lock time (model
GB/s and encrypted GB/s, end to end: read, encrypt, write, hash), and decryption GB/s of
encrypted bytes (in memory, decrypted where each block lies) on 1 and 2 threads (per core = 1t).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
from pathlib import Path

from harness.fixtures import fixture_model
from harness.measure import print_result, timed, write_result
from vllm_guard.secneuron.checkpoint import ffn_layout, load_checkpoint, save_checkpoint
from vllm_guard.secneuron.files import checkpoint_files, digest_files
from vllm_guard.secneuron.keys import TaskKey
from vllm_guard.secneuron.lock import lock_checkpoint
from vllm_guard.secneuron.manifest import read_manifest
from vllm_guard.secneuron.open import decrypt_in_place
from vllm_guard.secneuron.preflight import open_data_keys
from vllm_guard.secneuron.selection import Selection

TASKS = ["a", "b", "c"]


def random_selection(model: Path, fraction: float, seed: int = 0) -> Selection:
    layers = ffn_layout(load_checkpoint(model))
    rng = random.Random(seed)
    return Selection(TASKS, {
        layer: {t: sorted(rng.sample(range(info.intermediate_size),
                                     int(fraction * info.intermediate_size))) for t in TASKS}
        for layer, info in layers.items()})


def _plain_copy(src: Path, dst: Path) -> None:
    """What locking cannot avoid: load every tensor, save them again, hash the files."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    save_checkpoint(load_checkpoint(src), dst)
    digest_files(dst, checkpoint_files(dst))
    shutil.rmtree(dst)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="qwen2-0.5b-shape")
    ap.add_argument("--fraction", type=float, default=0.1, help="per task, per layer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default="1,2", help="decrypt thread counts to measure")
    ap.add_argument("--chunks", default="262144,1048576,4194304",
                    help="AEAD chunk sizes (bytes) to lock with and compare")
    args = ap.parse_args(argv)

    model = fixture_model(args.preset)
    keys = {t: TaskKey.generate(t) for t in TASKS}
    selection = random_selection(model, args.fraction)
    work = Path(tempfile.mkdtemp(prefix="bench-crypto-"))
    threads = [int(x) for x in args.threads.split(",")]
    per_chunk: dict[str, dict] = {}
    try:
        for chunk in (int(x) for x in args.chunks.split(",")):
            out = work / f"locked-{chunk}"
            print(f"locking with {chunk >> 10} KiB chunks ...", flush=True)
            lock_s, _ = timed(lambda out=out, chunk=chunk: lock_checkpoint(
                model, selection, keys, out, None, chunk_bytes=chunk, progress=False))
            manifest = read_manifest(out)
            enc_bytes = sum(c.length for g in manifest.groups for s in g.slices
                            for c in s.chunks)
            plain_s, ckpt = timed(lambda out=out: load_checkpoint(out), args.repeats)
            # The floor of any lock: read the model, write it back, hash what was written.
            copy_s, _ = timed(lambda out=out: _plain_copy(out, work / "copy"))
            row = {"lock_seconds": lock_s, "lock_model_gb_per_s": ckpt.nbytes / lock_s / 1e9,
                   "lock_encrypted_gb_per_s": enc_bytes / lock_s / 1e9,
                   "plain_copy_seconds": copy_s, "lock_over_plain_copy": lock_s / copy_s,
                   "plain_load_seconds": plain_s}
            for n in threads:
                def unlock(out=out, manifest=manifest, n=n) -> float:
                    c = load_checkpoint(out)
                    rep = decrypt_in_place(c.tensors, manifest, open_data_keys(manifest, keys),
                                           workers=n)
                    return rep.seconds

                _, secs = timed(lambda unlock=unlock: [unlock() for _ in range(args.repeats)])
                decrypt_s = statistics.median(secs)
                row[f"decrypt_gb_per_s_{n}t"] = enc_bytes / decrypt_s / 1e9
                row[f"decrypt_gb_per_s_{n}t_runs"] = [enc_bytes / s / 1e9 for s in secs]
            per_chunk[str(chunk)] = row
            shutil.rmtree(out, ignore_errors=True)
        best = max(per_chunk, key=lambda c: per_chunk[c][f"decrypt_gb_per_s_{threads[0]}t"])
        result = {"model": args.preset, "model_bytes": ckpt.nbytes, "encrypted_bytes": enc_bytes,
                  "groups": len(manifest.groups), "best_chunk_bytes": int(best),
                  **per_chunk[best], "per_chunk": per_chunk}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_result(result)
    write_result("crypto", result)
    return result


if __name__ == "__main__":
    main()
