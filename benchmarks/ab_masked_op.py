"""The CPU masked op of two source trees at 1 token, interleaved in one process, timed in
thread CPU time (steadier than wall time on a shared machine; one torch thread, so the
calling thread does all the work). For before/after figures of a change to the op:

    git archive REV | (mkdir -p /tmp/old && tar -x -C /tmp/old)
    python -m benchmarks.ab_masked_op /tmp/old     # old vs this checkout vs eager silu*mul
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parents[1]


def _load(root: Path):
    """The masked op and grant state of the tree at ``root`` (a fresh import of each)."""
    for name in [m for m in sys.modules if m == "vllm_guard" or m.startswith("vllm_guard.")]:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        import vllm_guard.kernels.masked_silu as op
        import vllm_guard.runtime.grant_state as state
    finally:
        sys.path.pop(0)
    return op, state


def _cpu_us(fn, calls: int) -> float:
    for _ in range(calls // 10):
        fn()
    start = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - start) / calls * 1e6


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", type=Path, help="the other source tree (holds vllm_guard/)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=1000)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    trees = {"old": _load(args.old), "new": _load(HERE)}
    public = 1 << 62
    for size in (4864, 16):  # 16: the fixed cost is all there is
        gen = torch.Generator().manual_seed(0)
        bits = torch.randint(1, 8, (size,), generator=gen, dtype=torch.int64)
        bits[torch.rand(size, generator=gen) < 0.87] = -1  # 13% locked, as bench_components
        for dtype in (torch.float32, torch.bfloat16):
            for grant, label in ((public | 1, "one task"), (public | 7, "all tasks")):
                x = torch.randn(1, 2 * size, generator=gen).to(dtype)
                fns = {"eager": lambda x=x, d=size: F.silu(x[:, :d]) * x[:, d:]}
                for tag, (op, state) in trees.items():
                    buf = state.STATE.ensure_buffer(8192)
                    state.STATE.fill([grant], np.array([1]))
                    fns[tag] = lambda x=x, op=op, b=bits, buf=buf: (
                        op.masked_silu_and_mul_torch(x, b, buf))
                times: dict[str, list[float]] = {k: [] for k in fns}
                for _ in range(args.rounds):  # interleaved: drift hits all three alike
                    for k, fn in fns.items():
                        times[k].append(_cpu_us(fn, args.calls))
                m = {k: statistics.median(v) for k, v in times.items()}
                print(f"I={size} {str(dtype)[6:]} {label}: eager {m['eager']:.2f} us | "
                      f"old {m['old']:.2f} (x{m['old'] / m['eager']:.2f}) | "
                      f"new {m['new']:.2f} (x{m['new'] / m['eager']:.2f}) | "
                      f"saved {m['old'] - m['new']:.2f} us", flush=True)


if __name__ == "__main__":
    main()
