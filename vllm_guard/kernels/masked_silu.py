"""Fused masked SiluAndMul: ``out[t, n] = silu(g[t, n]) * u[t, n] * ((bits[n] & grant[t]) != 0)``.

``x`` is ``[tokens, 2 * I]`` (gate | up), ``neuron_bits`` is int64 ``[I]`` (bit k: task k may
use neuron n; public neurons have every bit), ``grants`` is int64 ``[>= tokens]`` (the task
bits of each token's request, plus :data:`PUBLIC_BIT`). One pass, no table of grant sets.

Two implementations of one op:
- :func:`masked_silu_and_mul_torch`: the CPU path (what vLLM runs on CPU);
- :func:`masked_silu_and_mul_triton`: a Triton kernel for GPUs (tested on CPU with
  ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_guard.runtime.grant_state import STATE

MAX_RUNS = 8  # above this many grant runs in a step, one gathered multiply is cheaper


def masked_silu_and_mul_torch(x: torch.Tensor, neuron_bits: torch.Tensor,
                              grants: torch.Tensor) -> torch.Tensor:
    """The CPU path: vLLM's native values (bit for bit), then at most one masking multiply.

    The step's distinct grants and their token runs come from the runner hook's plan
    (:meth:`GrantState.step_plan`) and each table's keep row per grant is cached, so a layer
    does no per-step analysis: a grant that opens every neuron costs nothing, otherwise each
    run of tokens is multiplied by its grant's keep row (or, for many runs, by gathered rows).
    """
    d = x.shape[-1] // 2
    out = F.silu(x[..., :d]).mul_(x[..., d:])  # the values of vLLM's SiluAndMul.forward_native
    tokens = out.shape[0]
    if not tokens:
        return out
    plan = STATE.step_plan(tokens, grants)
    if out.element_size() == 2 and len(plan.runs) <= MAX_RUNS:
        # 16-bit: zero the closed columns of each run (cheaper than a multiply pass there)
        for start, end, gi in plan.runs:
            closed = STATE.closed_index(neuron_bits, plan.grants[gi])
            if closed is not None:
                (out if end - start == tokens else out[start:end]).index_fill_(1, closed, 0)
        return out
    if len(plan.grants) == 1:  # the common decode step: one multiply, no slicing
        keep = STATE.keep_row(neuron_bits, plan.grants[0], out.dtype)
        return out if keep is None else out.mul_(keep)
    keeps = [STATE.keep_row(neuron_bits, g, out.dtype) for g in plan.grants]
    if all(k is None for k in keeps):
        return out
    if len(plan.runs) <= MAX_RUNS:
        for start, end, gi in plan.runs:
            if keeps[gi] is not None:
                out[start:end].mul_(keeps[gi])
        return out
    ones = out.new_ones(d)
    table = torch.stack([ones if k is None else k for k in keeps])
    return out.mul_(table.index_select(0, plan.rows.to(out.device)))


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
    buffer is read at run time, every step (a Python-level read would be traced once)."""
    global _registered
    if _registered:
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op("guard_masked_silu_and_mul", masked_silu_and_mul,
                              mutates_args=[], fake_impl=_fake)
    _registered = True
