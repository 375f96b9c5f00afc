"""GPU check of the masked SiluAndMul: correctness, throughput, CUDA graphs, no host sync.

    python -m benchmarks.gpu_check [--out FILE]   # a GPU machine: one JSON line, < 4 min on an H100
    python -m benchmarks.gpu_check --cpu-smoke    # the same code on CPU: Triton interpreted
                                                  # (TRITON_INTERPRET=1), small shapes, no timing
    scripts/gpu_check.sh                          # the device run: JSON and log into $OUT

It runs where only PyTorch and Triton are installed (no vLLM, no network, nothing to pip
install): it imports the stdlib, torch, triton and ``vllm_guard.kernels.masked_silu`` alone
(which imports no vLLM; a unit test runs the smoke with vLLM, transformers and Presidio
blocked). Checks, each with its own pass/fail in the JSON:

- ``correctness``: the Triton kernel against a float32 torch reference, for fp16/bf16/fp32,
  I in {4864, 14336}, tokens in {1, 16, 256, 8192}, 1-3 grants per step: exact zeros where a
  neuron is locked for the token, within dtype tolerance elsewhere, every element written;
- ``throughput``: GB/s of bytes moved by the masked op, plain ``silu(g) * u`` eager and the
  same ``torch.compile``d, on the same shapes (CUDA events, warm-up, median of N). Two
  timings: one call after another (Python launch included, as in eager mode) and CUDA-graph
  replay (device time, as vLLM runs decode). Criterion: the Triton kernel moves >= 0.9x the
  GB/s of compiled plain silu*mul at >= 256 tokens, by graph replay;
- ``cuda_graph``: the op captured once, the grant buffer rewritten in place between replays:
  every replay follows the new grants;
- ``no_host_sync``: the op under ``torch.cuda.set_sync_debug_mode("error")``;
- ``self_test``: each check run against a broken op (mask ignored, values off, grants baked
  in at capture, a host sync) must fail, so a pass means something.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

PUBLIC = 1 << 62  # vllm_guard.runtime.PUBLIC_BIT (imported below, after TRITON_INTERPRET is set)
CRITERION = "Triton kernel >= 0.9x the GB/s of compiled plain silu*mul at >= 256 tokens"
MIN_RATIO, MIN_TOKENS = 0.9, 256
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}  # rtol = atol; 1 ulp of 16-bit fits
BUFFER_PAD = 64  # the grant buffer is longer than the batch, as in the server


@dataclass(frozen=True)
class Plan:
    """What one run covers; GPU and CPU smoke differ only here."""

    mode: str
    device: str
    dtypes: tuple[str, ...]
    sizes: tuple[int, ...]  # intermediate size I (x is [tokens, 2 * I])
    tokens: tuple[int, ...]
    grants_per_step: tuple[int, ...]
    warmup: int  # calls before timing
    samples: int  # timed samples; the median is reported
    inner: int  # calls per timed sample
    compile_backend: str  # torch.compile backend of the plain op
    budget_s: float  # past this, remaining throughput shapes are skipped (4 min limit)
    sweep: tuple[tuple[int, int], ...]  # (BLOCK, num_warps) of the kernel tried at >= 256 tokens
    bench_sizes: tuple[int, ...]  # throughput shapes (the smoke trims them: interpreted
    bench_tokens: tuple[int, ...]  # Triton costs milliseconds per program)


GPU = Plan("gpu", "cuda", ("float16", "bfloat16", "float32"), (4864, 14336), (1, 16, 256, 8192),
           (1, 2, 3), warmup=5, samples=15, inner=10, compile_backend="inductor",
           budget_s=200.0, sweep=((256, 4), (512, 4), (1024, 4), (1024, 8), (2048, 8)),
           bench_sizes=(4864, 14336), bench_tokens=(1, 16, 256, 8192))
# Inductor's C++ compile takes 20-70 s per shape on a busy 2-core machine: the smoke traces
# through dynamo with the eager backend (the same torch.compile call path, no codegen).
SMOKE = Plan("cpu-smoke", "cpu", ("float16", "bfloat16", "float32"), (40, 300), (1, 3, 17),
             (1, 2, 3), warmup=1, samples=1, inner=1, compile_backend="eager", budget_s=60.0,
             sweep=((64, 4), (256, 4)), bench_sizes=(40,), bench_tokens=(1, 8))

Op = Callable  # (x, neuron_bits, grants) -> out


def _torch():
    import torch

    return torch


def _dtype(name: str):
    return getattr(_torch(), name)


def _sig(v: float) -> float:
    return float(f"{v:.4g}")


class Clock:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


# --- inputs and the reference -----------------------------------------------------------

def make_bits(size: int, gen, device: str):
    """int64 [I]: three tasks; about half the neurons locked to one or two of them."""
    torch = _torch()
    bits = torch.randint(1, 8, (size,), generator=gen, dtype=torch.int64)
    bits[torch.rand(size, generator=gen) < 0.5] = -1  # public: every bit
    return bits.to(device)


GRANT_SETS = (PUBLIC | 1, PUBLIC | 6, PUBLIC)  # task 0; tasks 1+2; no task


def make_grants(tokens: int, n_grants: int, gen, device: str):
    """int64 [tokens + pad]: each token one of ``n_grants`` grant sets, in runs of requests;
    the padding holds a grant that opens everything (it must never be read)."""
    torch = _torch()
    sets = torch.tensor(GRANT_SETS[:n_grants], dtype=torch.int64)
    runs = torch.randint(0, n_grants, (tokens,), generator=gen)
    cut = torch.randint(1, max(2, tokens // 4 + 1), (1,), generator=gen).item()
    runs = runs[(torch.arange(tokens) // cut)]  # contiguous runs, as vLLM's batches are
    buf = torch.full((tokens + BUFFER_PAD,), -1, dtype=torch.int64)
    buf[:tokens] = sets[runs]
    return buf.to(device)


def make_x(tokens: int, size: int, dtype: str, gen, device: str):
    """[tokens, 2 * I] gate | up, drawn on the device (8192 x 28672 on the host takes seconds)."""
    torch = _torch()
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    dev_gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn(tokens, 2 * size, generator=dev_gen, device=device).mul_(3)
    return x.to(_dtype(dtype))


def reference(x, bits, grants):
    """float32 ``silu(g) * u`` where granted, else 0; and the keep mask."""
    F = _torch().nn.functional
    d = x.shape[-1] // 2
    keep = (bits[None, :] & grants[: x.shape[0], None]) != 0
    return F.silu(x[:, :d].float()) * x[:, d:].float() * keep, keep


def compare(out, x, bits, grants) -> dict:
    """Exact zeros where locked, within tolerance elsewhere, nothing left unwritten (NaN)."""
    torch = _torch()
    ref, keep = reference(x, bits, grants)
    tol = TOL[str(x.dtype).removeprefix("torch.")]
    o = out.float()
    unwritten = int(torch.isnan(o).sum())
    leaked = int(torch.count_nonzero(o.masked_fill(keep, 0).nan_to_num(0.0)))
    err = ((o - ref).abs() - tol * ref.abs()).nan_to_num(0.0)
    worst = float(err.max()) if err.numel() else 0.0
    return {"ok": unwritten == 0 and leaked == 0 and worst <= tol,
            "unwritten": unwritten, "leaked": leaked, "worst_excess": worst,
            "locked": int((~keep).sum())}


# --- check 1: correctness ----------------------------------------------------------------

def check_correctness(plan: Plan, op: Op, seed: int = 0) -> dict:
    torch = _torch()
    gen = torch.Generator().manual_seed(seed)
    failures, cases, locked = [], 0, 0
    for dtype in plan.dtypes:
        for size in plan.sizes:
            bits = make_bits(size, gen, plan.device)
            for tokens in plan.tokens:
                x = make_x(tokens, size, dtype, gen, plan.device)
                for n in plan.grants_per_step:
                    grants = make_grants(tokens, n, gen, plan.device)
                    out = torch.full((tokens, size), float("nan"), dtype=x.dtype,
                                     device=plan.device)  # poisoned: unwritten shows as NaN
                    out = op(x, bits, grants, out=out)
                    r = compare(out, x, bits, grants)
                    cases += 1
                    locked += r["locked"]
                    if not r["ok"]:
                        failures.append({"dtype": dtype, "I": size, "tokens": tokens,
                                         "grants": n, **r})
                del x
    return {"pass": not failures and cases > 0 and locked > 0, "cases": cases,
            "locked_elements_checked": locked, "failures": failures[:5]}


# --- check 2: CUDA graphs ----------------------------------------------------------------

def capture(plan: Plan, fn: Callable) -> Callable:
    """A replay of ``fn``: a CUDA graph on GPUs; on CPU a plain call (same check code)."""
    torch = _torch()
    if plan.device != "cuda":
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: Triton compiles on first call
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fn()

    def replay():
        graph.replay()
        return static

    replay.graph = graph  # kept alive with the closure
    return replay


def check_graph(plan: Plan, op: Op, bake_grants: bool = False) -> dict:
    """Capture once over a fixed grant buffer, then rewrite the buffer in place before each
    replay; each replay must match the reference for the grants it was given.
    ``bake_grants`` (self-test) hands the op a snapshot instead: a replay then never sees
    the new grants, which the check must catch."""
    torch = _torch()
    gen = torch.Generator().manual_seed(7)
    size, tokens, dtype = plan.sizes[0], plan.tokens[-1], "bfloat16"
    bits = make_bits(size, gen, plan.device)
    x = make_x(tokens, size, dtype, gen, plan.device)
    grants = make_grants(tokens, 1, gen, plan.device)
    seen = grants.clone() if bake_grants else grants
    replay = capture(plan, lambda: op(x, bits, seen))
    steps = [make_grants(tokens, n, gen, plan.device) for n in (1, 2, 3, 1)]
    steps += [torch.full_like(grants, PUBLIC), torch.full_like(grants, -1)]
    results = []
    for new in steps:
        grants.copy_(new)  # in place: the captured address stays
        out = replay()
        if plan.device == "cuda":
            torch.cuda.synchronize()
        results.append(compare(out, x, bits, grants))
    x.copy_(make_x(tokens, size, dtype, gen, plan.device))  # activations change too
    results.append(compare(replay(), x, bits, grants))
    return {"pass": all(r["ok"] for r in results), "replays": len(results),
            "tokens": tokens, "I": size, "graph": plan.device == "cuda",
            "failed_replays": [i for i, r in enumerate(results) if not r["ok"]]}


# --- check 3: no host synchronisation ----------------------------------------------------

@contextlib.contextmanager
def sync_guard(plan: Plan) -> Iterator[None]:
    """Any host synchronisation inside raises (CUDA only; a no-op on CPU)."""
    torch = _torch()
    if plan.device != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def check_no_sync(plan: Plan, op: Op) -> dict:
    torch = _torch()
    gen = torch.Generator().manual_seed(11)
    calls = []
    for dtype in plan.dtypes:
        for tokens in plan.tokens:
            size = plan.sizes[0]
            calls.append((make_x(tokens, size, dtype, gen, plan.device),
                          make_bits(size, gen, plan.device),
                          make_grants(tokens, 3, gen, plan.device)))
    for args in calls:  # warm-up outside the guard: the first launch compiles
        op(*args)
    error = None
    try:
        with sync_guard(plan):
            for args in calls:
                op(*args)
    except RuntimeError as e:  # what set_sync_debug_mode("error") raises
        error = str(e).splitlines()[0][:300]
    return {"pass": error is None, "calls": len(calls), "error": error,
            "enforced": plan.device == "cuda"}


# --- check 4: throughput -----------------------------------------------------------------

class Timer:
    """Median seconds per call: CUDA events on GPUs, perf_counter elsewhere."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def __call__(self, fn: Callable) -> float:
        torch = _torch()
        plan = self.plan
        for _ in range(plan.warmup):
            fn()
        times = []
        for _ in range(plan.samples):
            if plan.device == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(plan.inner):
                    fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3 / plan.inner)
            else:
                t = time.perf_counter()
                for _ in range(plan.inner):
                    fn()
                times.append((time.perf_counter() - t) / plan.inner)
        return statistics.median(times)


def graph_of(plan: Plan, fn: Callable) -> Callable:
    """``plan.inner`` calls of ``fn`` in one replay, so a sample times device work alone."""
    many = capture(plan, lambda: [fn() for _ in range(plan.inner)])
    return many


def moved_bytes(tokens: int, size: int, itemsize: int, masked: bool) -> int:
    """Bytes the op must move: read gate and up, write out (+ the neuron table and grants)."""
    return 3 * tokens * size * itemsize + ((8 * size + 8 * tokens) if masked else 0)


def check_throughput(plan: Plan, op: Op, clock: Clock) -> dict:
    torch = _torch()
    F = torch.nn.functional
    timer = Timer(plan)
    gen = torch.Generator().manual_seed(5)
    rows, skipped = [], []
    timed = plan.device == "cuda"
    for dtype in plan.dtypes:
        for size in plan.bench_sizes:
            # One compiled plain op per (dtype, I), dynamic over tokens after the first
            # recompile, as vLLM compiles (static hidden sizes, dynamic batch).
            torch._dynamo.reset()

            def plain(x, size=size):
                return F.silu(x[:, :size]) * x[:, size:]

            compiled = torch.compile(plain, backend=plan.compile_backend)
            bits = make_bits(size, gen, plan.device)
            for tokens in plan.bench_tokens:
                if clock.elapsed() > plan.budget_s:
                    skipped.append(f"{dtype}/{size}/{tokens}")
                    continue
                x = make_x(tokens, size, dtype, gen, plan.device)
                grants = make_grants(tokens, 3, gen, plan.device)
                item = x.element_size()
                fns = {"eager": lambda x=x: plain(x),
                       "compiled": lambda x=x, c=compiled: c(x),
                       "triton": lambda x=x, b=bits, g=grants: op(x, b, g)}
                row: dict = {"dtype": dtype, "I": size, "tokens": tokens}
                for name, fn in fns.items():
                    nbytes = moved_bytes(tokens, size, item, name == "triton")
                    launch_s = timer(fn)
                    graph_s = timer(graph_of(plan, fn)) / plan.inner
                    row[name] = {"launch_us": _sig(launch_s * 1e6),
                                 "graph_us": _sig(graph_s * 1e6),
                                 "launch_gbps": _sig(nbytes / launch_s / 1e9),
                                 "graph_gbps": _sig(nbytes / graph_s / 1e9)}
                for how in ("graph", "launch"):
                    row[f"triton_vs_compiled_{how}"] = _sig(
                        row["triton"][f"{how}_gbps"] / row["compiled"][f"{how}_gbps"])
                rows.append(row)
                del x
    judged = [r for r in rows if r["tokens"] >= MIN_TOKENS]
    passed = None  # not a measurement on CPU: no verdict
    if timed:
        passed = (bool(judged) and not skipped
                  and all(r["triton_vs_compiled_graph"] >= MIN_RATIO for r in judged))
    worst = min((r["triton_vs_compiled_graph"] for r in judged), default=None)
    return {"pass": passed, "criterion": CRITERION, "basis": "CUDA-graph replay, median",
            "timed": timed, "worst_ratio_at_256_plus": worst if timed else None,
            "samples": plan.samples, "calls_per_sample": plan.inner,
            "compile_backend": plan.compile_backend, "skipped_for_time": skipped, "rows": rows}


def sweep_blocks(plan: Plan, kernel: Callable, clock: Clock) -> dict:
    """The kernel's BLOCK and num_warps at >= 256 tokens, bf16 (informs its default)."""
    torch = _torch()
    gen = torch.Generator().manual_seed(9)
    timer = Timer(plan)
    rows = []
    for size in plan.bench_sizes:
        bits = make_bits(size, gen, plan.device)
        for tokens in [t for t in plan.bench_tokens if t >= min(MIN_TOKENS, plan.bench_tokens[-1])]:
            x = make_x(tokens, size, "bfloat16", gen, plan.device)
            grants = make_grants(tokens, 3, gen, plan.device)
            row: dict = {"I": size, "tokens": tokens}
            for block, warps in plan.sweep:
                if clock.elapsed() > plan.budget_s:
                    break

                def fn(x=x, n=bits, g=grants, b=block, w=warps):
                    return kernel(x, n, g, block=b, num_warps=w)

                ok = compare(fn(), x, bits, grants)["ok"]
                secs = timer(graph_of(plan, fn)) / plan.inner
                row[f"{block}x{warps}"] = {
                    "ok": ok, "graph_gbps": _sig(moved_bytes(tokens, size, 2, True) / secs / 1e9)}
            rows.append(row)
    return {"dtype": "bfloat16", "configs": [f"{b}x{w}" for b, w in plan.sweep], "rows": rows,
            "all_correct": all(v["ok"] for r in rows for v in r.values() if isinstance(v, dict))}


# --- self-test: each check must be able to fail -------------------------------------------

def self_test(plan: Plan, op: Op) -> dict:
    """Broken ops the checks must reject (small shapes: a few seconds)."""
    torch = _torch()
    small = Plan(**{**asdict(plan), "dtypes": ("float32", "bfloat16"), "sizes": (plan.sizes[0],),
                    "tokens": (1, plan.tokens[1]), "grants_per_step": (2,)})

    def unmasked(x, bits, grants, out=None):
        return op(x, torch.full_like(bits, -1), grants, out=out)

    def off_by_ten_percent(x, bits, grants, out=None):
        return op(x, bits, grants, out=out) * 1.1

    def syncing(x, bits, grants, out=None):
        grants[:1].cpu()  # a device-to-host copy inside the op
        return op(x, bits, grants, out=out)

    out = {"unmasked_caught": not check_correctness(small, unmasked)["pass"],
           "wrong_values_caught": not check_correctness(small, off_by_ten_percent)["pass"],
           "baked_grants_caught": not check_graph(small, op, bake_grants=True)["pass"]}
    if plan.device == "cuda":
        out["host_sync_caught"] = not check_no_sync(small, syncing)["pass"]
    out["pass"] = all(out.values())
    return out


# --- the run -----------------------------------------------------------------------------

def run(plan: Plan) -> dict:
    clock = Clock()
    torch = _torch()
    import triton

    from vllm_guard.kernels import masked_silu
    from vllm_guard.runtime import PUBLIC_BIT

    assert PUBLIC_BIT == PUBLIC
    if not masked_silu.HAS_TRITON:
        raise SystemExit("gpu_check: Triton is not importable here")
    kernel = masked_silu.masked_silu_and_mul_triton
    # On GPUs the op vLLM runs is the device dispatch; on CPU it would take the torch path,
    # so the smoke calls the (interpreted) Triton kernel directly.
    op = masked_silu.masked_silu_and_mul if plan.device == "cuda" else kernel

    def op_out(x, bits, grants, out=None):  # out= (a poisoned buffer) needs the kernel's API
        return op(x, bits, grants) if out is None else kernel(x, bits, grants, out=out)

    result: dict = {"check": "gpu_check", "mode": plan.mode, "torch": torch.__version__,
                    "triton": triton.__version__, "python": platform.python_version(),
                    "device": (torch.cuda.get_device_name() if plan.device == "cuda"
                               else platform.processor() or platform.machine()),
                    "criterion": CRITERION, "checks": {}, "seconds": {}}
    if plan.device == "cuda":
        gen = torch.Generator().manual_seed(1)
        x, bits = make_x(4, 64, "bfloat16", gen, "cuda"), make_bits(64, gen, "cuda")
        g = make_grants(4, 2, gen, "cuda")
        result["dispatch_is_triton"] = bool(torch.equal(op(x, bits, g), kernel(x, bits, g)))
    steps = [("self_test", lambda: self_test(plan, op_out)),
             ("correctness", lambda: check_correctness(plan, op_out)),
             ("cuda_graph", lambda: check_graph(plan, op_out)),
             ("no_host_sync", lambda: check_no_sync(plan, op_out)),
             ("throughput", lambda: check_throughput(plan, op_out, clock)),
             ("block_sweep", lambda: sweep_blocks(plan, kernel, clock))]
    for name, step in steps:
        t = time.perf_counter()
        try:
            result["checks"][name] = step()
        except Exception as e:  # one broken check must not hide the others' numbers
            result["checks"][name] = {"pass": False, "error": f"{type(e).__name__}: {e}"[:500]}
        result["seconds"][name] = round(time.perf_counter() - t, 2)
    verdicts = [c.get("pass") for n, c in result["checks"].items() if n != "block_sweep"]
    result["pass"] = all(v is not False for v in verdicts) and result.get(
        "dispatch_is_triton", True)
    result["seconds"]["total"] = round(clock.elapsed(), 2)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run on CPU: Triton interpreted, small shapes, no timing, no graphs")
    p.add_argument("--out", help="also write the JSON line to this file")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("gpu_check --cpu-smoke: set TRITON_INTERPRET=1 before Triton loads")
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is decorated
        plan = SMOKE
    else:
        plan = GPU
        if not _torch().cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device (use --cpu-smoke on a CPU machine)")
    # stdout carries the one JSON line alone: anything else printed (Python or C) goes to stderr
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            result = run(plan)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    line = json.dumps(result, separators=(",", ":"))
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    print(line)
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
