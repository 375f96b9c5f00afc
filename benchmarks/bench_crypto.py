"""Lock/unlock throughput on a realistic-shape model (issue: SecNeuron toolchain).

python -m benchmarks.bench_crypto [--preset qwen2-0.5b-shape] [--fraction 0.1]
Prints and writes benchmarks/results/crypto.json: lock and unlock GB/s of encrypted bytes,
and unlock time against a plain safetensors load of the same model.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
from pathlib import Path

from benchmarks.common import print_result, timed, write_result
from tests.support.fixtures import fixture_model
from vllm_guard.secneuron.checkpoint import ffn_layout, load_checkpoint
from vllm_guard.secneuron.keys import TaskKey
from vllm_guard.secneuron.lock import (
    Selection,
    decrypt_in_place,
    lock_checkpoint,
    open_data_keys,
)
from vllm_guard.secneuron.manifest import read_manifest

TASKS = ["a", "b", "c"]


def random_selection(model: Path, fraction: float, seed: int = 0) -> Selection:
    layers = ffn_layout(load_checkpoint(model))
    rng = random.Random(seed)
    return Selection(TASKS, {
        layer: {t: sorted(rng.sample(range(info.intermediate_size),
                                     int(fraction * info.intermediate_size))) for t in TASKS}
        for layer, info in layers.items()})


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="qwen2-0.5b-shape")
    ap.add_argument("--fraction", type=float, default=0.1, help="per task, per layer")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    model = fixture_model(args.preset)
    keys = {t: TaskKey.generate(t) for t in TASKS}
    selection = random_selection(model, args.fraction)
    work = Path(tempfile.mkdtemp(prefix="bench-crypto-"))
    try:
        lock_s, manifest = timed(lambda: lock_checkpoint(
            model, selection, keys, work / "locked", None, progress=False))
        manifest = read_manifest(work / "locked")
        enc_bytes = sum(c.length for g in manifest.groups for s in g.slices for c in s.chunks)
        plain_s, ckpt = timed(lambda: load_checkpoint(work / "locked"), args.repeats)

        def unlock() -> float:
            c = load_checkpoint(work / "locked")
            rep = decrypt_in_place(c.tensors, manifest, open_data_keys(manifest, keys))
            return rep.seconds

        unlock_s, decrypt_s = timed(unlock, args.repeats)
        result = {
            "model": args.preset, "model_bytes": ckpt.nbytes, "encrypted_bytes": enc_bytes,
            "groups": len(manifest.groups),
            "lock_seconds": lock_s, "lock_gb_per_s": enc_bytes / lock_s / 1e9,
            "decrypt_seconds": decrypt_s, "decrypt_gb_per_s": enc_bytes / decrypt_s / 1e9,
            "plain_load_seconds": plain_s, "unlock_seconds": unlock_s,
            "unlock_over_plain_load": unlock_s / plain_s,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_result(result)
    write_result("crypto", result)
    return result


if __name__ == "__main__":
    main()
