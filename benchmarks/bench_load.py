"""Weight-loading time: ``--load-format secneuron`` (all keys) vs plain safetensors, in vLLM.

python -m benchmarks.bench_load [--preset qwen2-0.5b-shape] [--repeats 2]
Starts plain vLLM and vLLM with vllm-guard on the same weights (the guarded one locked with
three task keys, all supplied), interleaved, and reads each server's "Loading weights took"
line. Writes benchmarks/results/load.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
from pathlib import Path

from benchmarks.bench_crypto import TASKS, random_selection
from harness.fixtures import fixture_model
from harness.measure import write_result
from harness.server import VllmServer
from vllm_guard.secneuron.keys import TaskKey, save_task_key
from vllm_guard.secneuron.lock import lock_checkpoint

LOAD_LINE = re.compile(r"Loading weights took ([0-9.]+) seconds")
PLAIN_ENV = {"VLLM_PLUGINS": "__no_plugin__"}


def load_seconds(model: Path, args: list[str], guard: bool, log: Path) -> float:
    env = {} if guard else PLAIN_ENV
    srv = VllmServer(str(model), ["--enforce-eager", "--dtype", "bfloat16",
                                  "--gpu-memory-utilization", "0.3", *args], log, env,
                     guard)
    with srv:
        pass
    found = LOAD_LINE.findall(srv.log_text())
    if not found:
        raise RuntimeError(f"no 'Loading weights took' line in {log}")
    return float(found[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="qwen2-0.5b-shape")
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--verify-weights", choices=["on", "off", "both"], default="both",
                    help="guarded runs with the signed-hash check of every weight byte "
                         "(the default) and/or without it")
    args = ap.parse_args(argv)

    model = fixture_model(args.preset)
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    keys = {t: TaskKey.generate(t) for t in TASKS}
    for t, k in keys.items():
        save_task_key(k, work / f"{t}.key")
    lock_checkpoint(model, random_selection(model, args.fraction), keys, work / "locked", None,
                    progress=False)
    modes = ["on", "off"] if args.verify_weights == "both" else [args.verify_weights]
    guarded_args = {m: ["--load-format", "secneuron", "--model-loader-extra-config",
                        json.dumps({"key_dir": str(work), "allow_unsigned": True,
                                    "verify_weights": m == "on"})] for m in modes}
    plain: list[float] = []
    guarded: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(args.repeats):  # interleaved: drift hits every config alike
        plain.append(load_seconds(model, [], False, work / f"plain{i}.log"))
        for m in modes:
            guarded[m].append(load_seconds(work / "locked", guarded_args[m], True,
                                           work / f"guard-{m}{i}.log"))
        print(f"run {i + 1}/{args.repeats}: plain {plain[-1]:.2f} s, " + ", ".join(
            f"secneuron verify={m} {guarded[m][-1]:.2f} s" for m in modes), flush=True)
    ratios = {m: statistics.median(guarded[m]) / statistics.median(plain) for m in modes}
    per_run = {m: [g / p for g, p in zip(guarded[m], plain, strict=True)] for m in modes}
    result = {"model": args.preset, "fraction_per_task": args.fraction, "repeats": args.repeats,
              "plain_load_s": plain, "secneuron_load_s": guarded,
              "ratio_median": ratios, "ratio_per_run": per_run, "target_ratio": 1.10}
    for m in modes:
        print(f"secneuron (verify_weights={m}) / plain load time: median {ratios[m]:.3f}x, "
              f"per run {min(per_run[m]):.2f}-{max(per_run[m]):.2f}x (target <= 1.10x)")
    write_result("load", result)
    return result


if __name__ == "__main__":
    main()
