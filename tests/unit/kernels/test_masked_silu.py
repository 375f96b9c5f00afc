"""Masked SiluAndMul: Triton kernel (TRITON_INTERPRET=1 on CPU) and torch path vs a reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vllm_guard.kernels.masked_silu import masked_silu_and_mul_torch
from vllm_guard.runtime import PUBLIC_BIT

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def cases(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for dtype in DTYPES:
        for tokens, d in [(1, 1), (3, 7), (17, 37), (5, 300), (2, 1000)]:
            x = (torch.randn(tokens, 2 * d, generator=gen) * 3).to(dtype)
            bits = torch.randint(1, 16, (d,), generator=gen, dtype=torch.int64)  # >= 1 task
            bits[torch.rand(d, generator=gen) < 0.3] = -1  # public neurons
            grants = torch.randint(0, 16, (tokens + 4,), generator=gen, dtype=torch.int64)
            grants |= PUBLIC_BIT
            yield f"{dtype}-{tokens}x{d}-mixed", x, bits, grants
            yield f"{dtype}-{tokens}x{d}-all", x, bits, torch.full((tokens,), -1)
            yield f"{dtype}-{tokens}x{d}-none", x, bits & 15, torch.full(
                (tokens,), PUBLIC_BIT)


def reference(x, bits, grants):
    d = x.shape[-1] // 2
    keep = (bits[None, :] & grants[: x.shape[0], None]) != 0
    return (F.silu(x[:, :d].float()) * x[:, d:].float() * keep).to(x.dtype), keep


def test_torch_path_matches_reference_and_masks_exactly():
    for name, x, bits, grants in cases():
        out = masked_silu_and_mul_torch(x, bits, grants)
        ref, keep = reference(x, bits, grants)
        torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[x.dtype],
                                   atol=TOL[x.dtype], msg=name)
        assert torch.count_nonzero(out[~keep]) == 0, name
        if name.endswith("-none"):
            assert torch.count_nonzero(out) == 0, name


def test_torch_path_is_bitwise_plain_silu_and_mul_when_all_granted():
    """All granted must equal vLLM's native SiluAndMul bit for bit (greedy outputs match)."""
    for _, x, bits, _ in cases(1):
        d = x.shape[-1] // 2
        plain = F.silu(x[:, :d]) * x[:, d:]
        out = masked_silu_and_mul_torch(x, bits, torch.full((x.shape[0],), -1))
        assert torch.equal(out, plain)


def _check_triton() -> None:
    """Runs in a subprocess with TRITON_INTERPRET=1 (it must be set before triton loads)."""
    from vllm_guard.kernels.masked_silu import HAS_TRITON, masked_silu_and_mul_triton

    assert HAS_TRITON
    checked = 0
    for name, x, bits, grants in cases():
        ref, keep = reference(x, bits, grants)
        for block in (16, 64, 256):
            out = torch.full_like(ref, float("nan"))  # poisoned: unwritten elements show
            masked_silu_and_mul_triton(x, bits, grants, block=block, out=out)
            assert not torch.isnan(out).any(), f"{name} block {block}: unwritten output"
            torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[x.dtype],
                                       atol=TOL[x.dtype], msg=f"{name} block {block}")
            assert torch.count_nonzero(out[~keep]) == 0, name
            checked += 1
    print(f"triton cases checked: {checked}")


def test_triton_kernel_under_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c",
                          "import tests.unit.kernels.test_masked_silu as t; t._check_triton()"],
                         env=env, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[3])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "triton cases checked: 135" in out.stdout


def test_planned_step_masks_per_token_without_per_layer_analysis(monkeypatch):
    """The runner hook plans the step once; layers then use the plan (no torch.unique per
    layer) and cached drop rows, and the result is exactly the reference."""
    import numpy as np

    from vllm_guard.runtime.grant_state import GrantState

    state = GrantState()
    monkeypatch.setattr("vllm_guard.kernels.masked_silu.STATE", state)
    buf = state.ensure_buffer(64)
    gen = torch.Generator().manual_seed(3)
    d = 50
    bits = torch.randint(1, 8, (d,), generator=gen, dtype=torch.int64)
    bits[:10] = -1
    calls = []
    for fn in ("unique", "unique_consecutive"):
        real = getattr(torch, fn)
        monkeypatch.setattr(torch, fn, lambda *a, _r=real, **k: calls.append(1) or _r(*a, **k))
    many = [PUBLIC_BIT | (i % 3 + 1) for i in range(12)]  # more runs than MAX_RUNS: gathered
    for per_request, counts in (([PUBLIC_BIT | 1, PUBLIC_BIT | 6], [3, 2]),
                                ([PUBLIC_BIT | 7], [4]), ([-1], [2]),
                                ([PUBLIC_BIT, PUBLIC_BIT | 2, PUBLIC_BIT], [1, 5, 2]),
                                (many, [1, 2] * 6)):
        state.fill(per_request, np.array(counts))
        x = torch.randn(sum(counts), 2 * d, generator=gen)
        for _ in range(3):  # three "layers" of one step
            out = masked_silu_and_mul_torch(x, bits, buf)
            ref, keep = reference(x, bits, buf)
            torch.testing.assert_close(out, ref)
            assert torch.count_nonzero(out[~keep]) == 0
    assert not calls, "a layer re-derived the step's grants"
    bits.copy_(torch.full((d,), 1))  # the loader re-attaches in place: the cache must notice
    state.fill([PUBLIC_BIT | 2], np.array([2]))
    assert torch.count_nonzero(masked_silu_and_mul_torch(torch.randn(2, 2 * d), bits, buf)) == 0


def test_decode_steps_reuse_each_layers_masking_and_follow_changes(monkeypatch):
    """Consecutive steps with the same grants (decode) look nothing up again per layer call;
    a table rewritten in place, a new plan and a direct call on another buffer still mask
    exactly."""
    import numpy as np

    from vllm_guard.runtime.grant_state import GrantState

    state = GrantState()
    monkeypatch.setattr("vllm_guard.kernels.masked_silu.STATE", state)
    buf = state.ensure_buffer(16)
    gen = torch.Generator().manual_seed(5)
    d = 40
    tables = [torch.randint(1, 8, (d,), generator=gen, dtype=torch.int64) for _ in range(3)]
    lookups = []
    for name in ("keep_row", "closed_index"):
        real = getattr(state, name)
        monkeypatch.setattr(state, name, lambda *a, _r=real: lookups.append(1) or _r(*a))

    def layers(tokens):
        x = {dt: torch.randn(tokens, 2 * d, generator=gen).to(dt)
             for dt in (torch.float32, torch.bfloat16)}
        for table in tables:
            for xt in x.values():
                out = masked_silu_and_mul_torch(xt, table, buf)
                ref, keep = reference(xt, table, buf)
                torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[xt.dtype],
                                           atol=TOL[xt.dtype])
                assert torch.count_nonzero(out[~keep]) == 0

    for _ in range(4):  # four decode steps of the same two requests
        state.fill([PUBLIC_BIT | 1, PUBLIC_BIT | 6], np.array([1, 1]))
        layers(2)
    first_step = len(tables) * 2 * 2  # tables x dtypes x grants
    assert len(lookups) == first_step, "later steps looked the masking up again"
    tables[0].copy_(torch.full((d,), 2))  # re-attached in place under the same plan
    state.fill([PUBLIC_BIT | 1, PUBLIC_BIT | 6], np.array([1, 1]))
    layers(2)
    state.fill([PUBLIC_BIT | 2], np.array([3]))  # a new plan
    layers(3)
    other = torch.full((8,), PUBLIC_BIT | 4, dtype=torch.int64)  # not the hook's buffer
    x = torch.randn(3, 2 * d, generator=gen)
    ref, keep = reference(x, tables[1], other)
    torch.testing.assert_close(masked_silu_and_mul_torch(x, tables[1], other), ref)


def test_step_plan_is_the_hooks_plan_and_memo_only_for_the_hooks_call():
    """One check of "is this the hook's step" gives both the plan and the memo: a call on the
    hook's buffer and token count gets them, any other call a derived plan and no memo."""
    import numpy as np

    from vllm_guard.runtime.grant_state import GrantState

    state = GrantState()
    buf = state.ensure_buffer(8)
    state.fill([PUBLIC_BIT | 1, PUBLIC_BIT | 2], np.array([2, 1]))
    plan, memo = state.step_plan(3, buf)
    assert plan is state.plan and memo is state.memo
    for tokens, grants in ((2, buf), (3, buf.clone())):  # padding/dummy run, a direct call
        derived, memo = state.step_plan(tokens, grants)
        assert memo is None and derived.tokens == tokens
        assert derived.grants == tuple(sorted({int(g) for g in grants[:tokens]}))
