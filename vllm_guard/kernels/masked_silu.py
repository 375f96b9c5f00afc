"""Fused masked SiluAndMul: ``out[t, n] = silu(g[t, n]) * u[t, n] * ((bits[n] & grant[t]) != 0)``.

``x`` is ``[tokens, 2 * I]`` (gate | up), ``neuron_bits`` is int64 ``[I]`` (bit k: task k may
use neuron n; public neurons have every bit), ``grants`` is int64 ``[>= tokens]`` (the task
bits of each token's request, plus :data:`PUBLIC_BIT`). One pass, no table of grant sets.

Implementations of one op:
- :func:`masked_silu_and_mul_torch`: the eager CPU path (``--enforce-eager`` on CPU);
- :func:`masked_silu_and_mul_triton`: a Triton kernel for eager GPUs (tested on CPU with
  ``TRITON_INTERPRET=1``);
- :func:`masked_silu_and_mul_rows`: what a layer traces under torch.compile (vLLM's default
  mode): a multiply by the layer's keep table gathered per token, fused by Inductor;
- :func:`mask_columns_` / :func:`mask_columns_rows`: the same mask on any ``[tokens, C]``
  input (eager, compiled): a sealed capability's heads at the o_proj input;
- :func:`masked_silu_and_mul_traced`: the bit test as tensor operations, measured against
  the keep table by ``benchmarks.bench_components`` (slower on CPU from 8 tokens on).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_guard.runtime.grant_state import STATE, MaskingSteps, StepPlan

MAX_RUNS = 8  # above this many grant runs in a step, one gathered multiply is cheaper


def masked_silu_and_mul_torch(x: torch.Tensor, neuron_bits: torch.Tensor,
                              grants: torch.Tensor) -> torch.Tensor:
    """The CPU path: vLLM's native values (bit for bit), then at most one masking pass.

    The step's distinct grants and their token runs come from the runner hook's plan
    (:meth:`GrantState.step_plan`) and each table's keep row per grant is cached, so a layer
    does no per-step analysis: what a layer does under a plan (:func:`_masking`) is worked out
    once and kept while the plan stays (every decode step of the same requests), so a call
    costs one dict lookup beyond the masking pass itself.
    """
    d = x.shape[-1] // 2
    out = F.silu(x[..., :d]).mul_(x[..., d:])  # the values of vLLM's SiluAndMul.forward_native
    return mask_columns_(out, neuron_bits, grants)


def mask_columns_(out: torch.Tensor, column_bits: torch.Tensor,
                  grants: torch.Tensor) -> torch.Tensor:
    """Zero, in place, each token's columns its grant may not use: ``out[t, c]`` kept where
    ``(column_bits[c] & grants[t]) != 0``. The masking pass of the eager CPU path, for FFN
    neurons (above) and for sealed heads' columns at the o_proj input (kernels.layer)."""
    tokens = out.shape[0]
    if not tokens:
        return out
    plan, memo = STATE.step_plan(tokens, grants)
    if memo is None:  # not the hook's step: the plan was derived from the buffer itself
        steps = _masking(plan, column_bits, out)
    else:
        key = (id(column_bits), column_bits._version, out.dtype)
        steps = memo.get(key)
        if steps is None:
            steps = memo[key] = _masking(plan, column_bits, out)
    for start, end, kind, t in steps:
        target = out if start is None else out[start:end]
        if kind is _FILL:
            target.index_fill_(1, t, 0)
        elif kind is _MUL:
            target.mul_(t)
        else:  # gathered rows: t is (table, token rows)
            target.mul_(t[0].index_select(0, t[1]))
    return out


_FILL, _MUL, _GATHER = "fill", "mul", "gather"


def _masking(plan: StepPlan, neuron_bits: torch.Tensor, out: torch.Tensor) -> MaskingSteps:
    """The masking passes of one layer under ``plan``: (start, end, kind, tensor) each, start
    None for the whole output; () when the step's grants open every neuron.

    fp32 and bf16 multiply by cached keep rows: on this project's 2-core AMD EPYC machine
    the multiply beat zeroing the closed columns (``index_fill_``) at every size, for bf16
    2.8 vs 4.5 us at 1 token and 366 vs 579 us at 256 (I=4864, 13% closed, one thread; an
    Intel Xeon favoured the fill at 256 tokens). bf16 has fp32's range, so a real activation
    does not overflow to inf (inf * 0 = NaN); a NaN activation (NaN in the input) still reads
    NaN after * 0 where zeroing would give 0, for bf16 as for fp32."""
    whole = len(plan.runs) == 1
    if out.dtype == torch.float16 and len(plan.runs) <= MAX_RUNS:
        # fp16: zero the closed columns of each run. A multiply is faster (2.4 vs 4.6 us at
        # 1 token, 259 vs 578 at 256, AMD EPYC) but fp16 overflows to inf in reach of real
        # activations, and inf * 0 is NaN where the neuron must read 0.
        steps = []
        for start, end, gi in plan.runs:
            closed = STATE.closed_index(neuron_bits, plan.grants[gi])
            if closed is not None:
                steps.append((None, None, _FILL, closed) if whole else
                              (start, end, _FILL, closed))
        return tuple(steps)
    if len(plan.grants) == 1:  # the common decode step: one multiply, no slicing
        keep = STATE.keep_row(neuron_bits, plan.grants[0], out.dtype)
        return () if keep is None else ((None, None, _MUL, keep),)
    keeps = [STATE.keep_row(neuron_bits, g, out.dtype) for g in plan.grants]
    if all(k is None for k in keeps):
        return ()
    if len(plan.runs) <= MAX_RUNS:
        return tuple((start, end, _MUL, keeps[gi]) for start, end, gi in plan.runs
                     if keeps[gi] is not None)
    ones = out.new_ones(out.shape[-1])
    table = torch.stack([ones if k is None else k for k in keeps])
    return ((None, None, _GATHER, (table, plan.rows.to(out.device))),)


def masked_silu_and_mul_traced(x: torch.Tensor, neuron_bits: torch.Tensor,
                               grants: torch.Tensor) -> torch.Tensor:
    """The form traced under torch.compile: the mask as tensor operations on the grant
    buffer and the neuron table. Traced, the buffer is a graph input read by the compiled
    kernel at run time, every step (vLLM runs its graph with every guard dropped, so a value
    read in Python while tracing would be baked in for good), and Inductor fuses the mask
    into vLLM's ``silu * mul`` loop. ``where``, not a multiply: a closed neuron reads exactly
    0 even where the activation overflowed (fp16: inf * 0 is NaN) or the input was NaN."""
    d = x.shape[-1] // 2
    keep = (neuron_bits & grants[: x.shape[0], None]) != 0
    return torch.where(keep, F.silu(x[..., :d]) * x[..., d:], 0)


def masked_silu_and_mul_rows(x: torch.Tensor, keep_table: torch.Tensor,
                             rows: torch.Tensor) -> torch.Tensor:
    """The compiled form: ``silu(g) * u * keep_table[rows[t]]``. ``keep_table`` is a layer's
    [R, I] table in the activation dtype, row 0 the public neurons and rows 1.. the step's
    grants; ``rows`` gives each token its row. Both are filled in place by the runner hook
    (``GrantState.fill``) and read by the compiled kernel at run time. Inductor fuses the
    gathered multiply into the silu-mul loop; on the AMD EPYC above it costs 1.02-1.05x the
    plain compiled op at 256 tokens, where the bit test of the traced form costs 2.2-2.6x.
    fp16 selects (``where``) instead of multiplying: inf * 0 would be NaN."""
    d = x.shape[-1] // 2
    return mask_columns_rows(F.silu(x[..., :d]) * x[..., d:], keep_table, rows)


def mask_columns_rows(x: torch.Tensor, keep_table: torch.Tensor,
                      rows: torch.Tensor) -> torch.Tensor:
    """The compiled form of :func:`mask_columns_`: ``x * keep_table[rows[t]]`` (a new
    tensor), with the keep table and rows of :func:`masked_silu_and_mul_rows`; fp16 selects."""
    keep = keep_table[rows[: x.shape[0]]]
    if x.dtype == torch.float16 or keep.dtype != x.dtype:
        return torch.where(keep != 0, x, 0)
    return x * keep


try:  # Triton is optional: absent or without a backend on CPU-only installs.
    import triton
    import triton.language as tl

    @triton.jit
    def _masked_silu_and_mul_kernel(x_ptr, out_ptr, bits_ptr, grant_ptr, d, stride_x,
                                    stride_out, BLOCK: tl.constexpr):
        tok = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < d
        gate = tl.load(x_ptr + tok * stride_x + offs, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + tok * stride_x + d + offs, mask=inside, other=0.0).to(tl.float32)
        bits = tl.load(bits_ptr + offs, mask=inside, other=0)
        grant = tl.load(grant_ptr + tok)
        y = gate / (1.0 + tl.exp(-gate)) * up
        y = tl.where((bits & grant) != 0, y, 0.0)
        tl.store(out_ptr + tok * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=inside)

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAS_TRITON = False


def masked_silu_and_mul_triton(x: torch.Tensor, neuron_bits: torch.Tensor,
                               grants: torch.Tensor, block: int = 256,
                               out: torch.Tensor | None = None,
                               num_warps: int | None = None) -> torch.Tensor:
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed")
    tokens, d = x.shape[0], x.shape[-1] // 2
    if out is None:
        out = torch.empty((tokens, d), dtype=x.dtype, device=x.device)
    if tokens:
        grid = (tokens, triton.cdiv(d, block))
        extra = {} if num_warps is None else {"num_warps": num_warps}  # benchmarks' sweep
        _masked_silu_and_mul_kernel[grid](x, out, neuron_bits, grants, d, x.stride(0),
                                          out.stride(0), BLOCK=block, **extra)
    return out


def masked_silu_and_mul(x: torch.Tensor, neuron_bits: torch.Tensor,
                        grants: torch.Tensor) -> torch.Tensor:
    """Device dispatch: Triton on GPUs, torch elsewhere."""
    if x.is_cuda and HAS_TRITON:
        return masked_silu_and_mul_triton(x, neuron_bits, grants)
    return masked_silu_and_mul_torch(x, neuron_bits, grants)


def _fake(x: torch.Tensor, neuron_bits: torch.Tensor, grants: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[:-1] + (x.shape[-1] // 2,))


_registered = False


def register_custom_op() -> None:
    """``torch.ops.vllm.guard_masked_silu_and_mul``: opaque to torch.compile, so the grant
    buffer is read at run time, every step (a Python-level read would be traced once); what
    a layer traced without a keep table calls."""
    global _registered
    if _registered:
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op("guard_masked_silu_and_mul", masked_silu_and_mul,
                              mutates_args=[], fake_impl=_fake)
    _registered = True
