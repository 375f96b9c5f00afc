"""Shared benchmark plumbing: machine info, timing, JSON results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def machine_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f
                                if ln.startswith("model name")), "")
    except OSError:
        pass
    return info


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation (numpy's default; p50 is the median);
    0 for no values."""
    if not values:
        return 0.0
    values = sorted(values)
    pos = q / 100 * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def timed(fn: Callable[[], object], repeats: int = 1) -> tuple[float, object]:
    """Median wall time over ``repeats`` runs and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def write_result(name: str, result: dict, out: Path | None = None) -> Path:
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "machine": machine_info(), **result}, indent=1))
    print(f"wrote {path}")
    return path


def print_result(result: dict) -> None:
    """One aligned line per figure, floats to 3 decimals."""
    width = max(map(len, result), default=0)
    for k, v in result.items():
        print(f"{k:>{width}}: {v:.3f}" if isinstance(v, float) else f"{k:>{width}}: {v}")
