"""The masked activation's forward under torch.compile, compiled as vLLM compiles it (whole
graph, every guard dropped): the grant buffer must be a graph input read at run time, so an
in-place update between two calls of an already compiled graph changes what it masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vllm_guard.kernels.layer as layer
from vllm_guard.kernels.layer import KEEP_TABLE_ATTR, MaskedForward, MaskedInputForward
from vllm_guard.kernels.masked_silu import register_custom_op
from vllm_guard.runtime import GRANT_BUFFER_ATTR, HEAD_BITS_ATTR, NEURON_BITS_ATTR, PUBLIC_BIT
from vllm_guard.runtime.grant_state import GrantState

D = 24  # neurons; 8 belong to task 1 only, 8 to task 2 only, 8 are public


@pytest.fixture(autouse=True, scope="module")
def _opaque_op() -> None:
    register_custom_op()  # what a layer traced without a keep table calls


class Act(MaskedForward, nn.Module):
    """The real forward (kernels.layer.MaskedForward) on a plain module."""

    @staticmethod
    def forward_native(x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


class PythonReadAct(Act):
    """The wrong way: the step's grant read in Python while tracing (what a plan or a cached
    keep row looked up in Python amounts to). Traced once, the value is baked in."""

    state: GrantState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grant = self.state.plan.grants[0]
        keep = (getattr(self, NEURON_BITS_ATTR) & grant) != 0
        return torch.where(keep, self.forward_native(x), 0)


def _table() -> torch.Tensor:
    bits = torch.full((D,), -1, dtype=torch.int64)
    bits[:8], bits[8:16] = 1, 2
    return bits


def _reference(x: torch.Tensor, bits: torch.Tensor, grants: torch.Tensor) -> torch.Tensor:
    keep = (bits & grants[: x.shape[0], None]) != 0
    return torch.where(keep, Act.forward_native(x), 0)


def _compile_like_vllm(module: nn.Module, backend) -> nn.Module:  # noqa: ANN001
    return torch.compile(module, fullgraph=True, dynamic=False, backend=backend,
                         options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})


def _follows_buffer(cls: type[Act], backend, monkeypatch, tables: int = 0,  # noqa: ANN001
                    dtype=torch.float32) -> bool:
    """Compile once with task 1 granted, then grant task 2 (buffer updated in place, as the
    runner hook does): does the compiled graph mask by the new grant? ``tables``: rows of
    the keep tables (the form vLLM's compile mode gets); 0: no table (the opaque op)."""
    import numpy as np

    torch._dynamo.reset()
    state = GrantState()
    monkeypatch.setattr(layer, "STATE", state)
    buf = state.ensure_buffer(64)
    act = cls()
    act.state = state
    act.guard_table_rows, act.guard_table_dtype = tables, dtype
    setattr(act, NEURON_BITS_ATTR, _table())
    assert hasattr(act, KEEP_TABLE_ATTR) == bool(tables)
    setattr(act, GRANT_BUFFER_ATTR, buf)
    compiled = _compile_like_vllm(act, backend)
    gen = torch.Generator().manual_seed(0)
    follows = True
    big = 12  # a prefill-sized step beside the decode-sized ones
    steps = [([PUBLIC_BIT | 1], [3]), ([PUBLIC_BIT | 2], [3]), ([PUBLIC_BIT], [5]),
             ([PUBLIC_BIT | 1], [big]), ([PUBLIC_BIT | 2], [big]), ([PUBLIC_BIT | 3], [2]),
             ([PUBLIC_BIT | 1, PUBLIC_BIT, PUBLIC_BIT | 2], [2, 1, 3]),  # mixed steps
             ([PUBLIC_BIT | 2, PUBLIC_BIT | 1], [1, big])]
    for grants, counts in steps:
        state.fill(grants, np.array(counts))
        tokens = sum(counts)
        x = torch.randn(tokens, 2 * D, generator=gen).to(dtype)
        torch._dynamo.mark_dynamic(x, 0)  # vLLM's dynamic token dimension
        out = compiled(x)
        ref = _reference(x, getattr(act, NEURON_BITS_ATTR), buf)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        follows &= torch.equal(out == 0, ref == 0) and torch.allclose(
            out.float(), ref.float(), rtol=tol, atol=tol)
    return follows


@pytest.mark.parametrize("tables", [17, 0])  # keep tables (compile mode), the opaque op
def test_compiled_forward_follows_in_place_grant_updates_and_python_read_would_not(
        tables, monkeypatch):
    assert _follows_buffer(Act, "inductor", monkeypatch, tables)
    assert _follows_buffer(Act, "inductor", monkeypatch, tables, torch.bfloat16)
    # The check can fail: a Python-level read of the grant is baked into the graph.
    assert not _follows_buffer(PythonReadAct, "inductor", monkeypatch, tables)


def test_keep_tables_follow_a_table_rewritten_in_place(monkeypatch):
    """The loader may rewrite a neuron table in place (same identity): the keep table the
    compiled graph holds must follow at the next step even with the same grants."""
    import numpy as np

    state = GrantState()
    monkeypatch.setattr(layer, "STATE", state)
    state.ensure_buffer(16)
    act = Act()
    act.guard_table_rows = 4
    setattr(act, NEURON_BITS_ATTR, _table())
    keep = getattr(act, KEEP_TABLE_ATTR)
    state.fill([PUBLIC_BIT | 1], np.array([2]))
    assert keep[1, :8].eq(1).all() and keep[1, 8:16].eq(0).all()
    getattr(act, NEURON_BITS_ATTR)[:8] = 2  # task 1's neurons now task 2's
    state.fill([PUBLIC_BIT | 1], np.array([2]))
    assert keep[1, :16].eq(0).all() and keep[0, :16].eq(0).all() and keep[:, 16:].eq(1).all()
    assert state.rows[:3].tolist() == [1, 1, 0]  # padding: the public row
    with pytest.raises(RuntimeError, match="grant sets in a step"):
        state.fill([PUBLIC_BIT | i for i in range(1, 5)], np.array([1] * 4))


def test_keep_table_and_rows_are_graph_inputs_not_constants(monkeypatch):
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list):  # noqa: ANN202
        graphs.append(gm)
        return gm.forward

    assert _follows_buffer(Act, record, monkeypatch, tables=9)
    gm, = graphs  # one graph, compiled once for every token count
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert any(KEEP_TABLE_ATTR in n for n in placeholders), placeholders
    assert any("rows" in n for n in placeholders), placeholders
    assert not [n for n in gm.graph.nodes if n.op == "get_attr"], "a tensor was baked in"


def test_grant_buffer_and_neuron_table_are_graph_inputs_not_constants(monkeypatch):
    """The form without a keep table: the opaque op, handed the grant buffer and table."""
    graphs: list[tuple[torch.fx.GraphModule, list]] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list):  # noqa: ANN202
        graphs.append((gm, example_inputs))
        return gm.forward

    assert _follows_buffer(Act, record, monkeypatch)
    (gm, _), = graphs  # one graph, compiled once for every token count
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert any(GRANT_BUFFER_ATTR in n for n in placeholders), placeholders
    assert any(NEURON_BITS_ATTR in n for n in placeholders), placeholders
    baked = [n.target for n in gm.graph.nodes if n.op == "get_attr"
             and not isinstance(getattr(gm, n.target), torch.fx.GraphModule)]
    assert not baked, f"tensors baked in: {baked}"
    assert "guard_masked_silu_and_mul" in gm.code  # the opaque op, read at run time


@pytest.mark.parametrize("tables", [5, 0])
def test_compiled_fp16_closed_neuron_reads_zero_even_when_activation_is_inf(tables,
                                                                            monkeypatch):
    import numpy as np

    torch._dynamo.reset()
    state = GrantState()
    monkeypatch.setattr(layer, "STATE", state)
    buf = state.ensure_buffer(64)
    act = Act()
    act.guard_table_rows, act.guard_table_dtype = tables, torch.float16
    setattr(act, NEURON_BITS_ATTR, _table())
    setattr(act, GRANT_BUFFER_ATTR, buf)
    compiled = _compile_like_vllm(act, "inductor")
    for tokens in (2, 10, 1):
        state.fill([PUBLIC_BIT | 1], np.array([tokens]))
        x = torch.full((tokens, 2 * D), 300.0, dtype=torch.float16)  # 300 * 300 overflows
        torch._dynamo.mark_dynamic(x, 0)
        out = compiled(x)
        assert torch.isinf(out[:, :8]).all()  # task 1: open (and overflowed)
        assert torch.count_nonzero(out[:, 8:16]) == 0  # task 2: closed, exactly 0, not NaN
        assert torch.isinf(out[:, 16:]).all()  # public


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_eager_forward_masks_and_is_native_when_all_granted(dtype):
    act = Act()
    x = torch.randn(5, 2 * D).to(dtype)
    assert torch.equal(act(x), Act.forward_native(x))  # no table: not a secneuron model
    setattr(act, NEURON_BITS_ATTR, _table())
    setattr(act, GRANT_BUFFER_ATTR, torch.full((8,), PUBLIC_BIT | 2, dtype=torch.int64))
    out = act(x)
    assert torch.count_nonzero(out[:, :8]) == 0
    torch.testing.assert_close(out[:, 8:], Act.forward_native(x)[:, 8:])
    setattr(act, GRANT_BUFFER_ATTR, torch.full((8,), -1, dtype=torch.int64))
    assert torch.equal(act(x), Act.forward_native(x))


# --- sealed heads: the masked o_proj input (kernels.layer.MaskedInputForward) -------------

class OProj(MaskedInputForward, nn.Linear):
    """The real masked-input forward on a plain linear layer (vLLM's is RowParallelLinear)."""


def _head_bits() -> torch.Tensor:
    bits = torch.full((D,), -1, dtype=torch.int64)
    bits[16:] = 2  # task 1's heads: the last 8 columns (one block, as the lock requires)
    return bits


def _o_proj_reference(o: OProj, x: torch.Tensor, grants: torch.Tensor) -> torch.Tensor:
    keep = (_head_bits() & grants[: x.shape[0], None]) != 0
    return nn.functional.linear(torch.where(keep, x, 0), o.weight, o.bias)


def test_eager_o_proj_gives_each_token_its_own_heads():
    """A mixed step: tokens whose grant holds the task see its heads, the others compute
    exactly what the public model (those heads' outputs zero) computes."""
    torch.manual_seed(0)
    o = OProj(D, 6)
    x = torch.randn(5, D)
    assert torch.equal(o(x.clone()), nn.functional.linear(x, o.weight, o.bias))  # no table
    setattr(o, HEAD_BITS_ATTR, _head_bits())
    grants = torch.tensor([PUBLIC_BIT | 2, PUBLIC_BIT, PUBLIC_BIT | 2, PUBLIC_BIT | 1,
                           PUBLIC_BIT])
    setattr(o, GRANT_BUFFER_ATTR, grants)
    out = o(x.clone())
    torch.testing.assert_close(out, _o_proj_reference(o, x, grants))
    public = nn.functional.linear(torch.cat([x[:, :16], torch.zeros(5, 8)], 1), o.weight,
                                  o.bias)
    assert torch.equal(out[[1, 3, 4]], public[[1, 3, 4]])  # bit for bit the public model
    assert not torch.allclose(out[[0, 2]], public[[0, 2]])  # the heads do change the output
    # [batch, tokens, C] (a layout vLLM's own models do not use): still one grant per token
    torch.testing.assert_close(o(x.clone()[None]), out[None])


@pytest.mark.parametrize("tables", [9, 0])  # keep tables (compile mode), the bit test
def test_compiled_o_proj_follows_in_place_grant_updates(tables, monkeypatch):
    import numpy as np

    torch._dynamo.reset()
    state = GrantState()
    monkeypatch.setattr(layer, "STATE", state)
    buf = state.ensure_buffer(64)
    torch.manual_seed(0)
    o = OProj(D, 6)
    o.guard_table_rows = tables
    setattr(o, HEAD_BITS_ATTR, _head_bits())
    assert hasattr(o, KEEP_TABLE_ATTR) == bool(tables)
    setattr(o, GRANT_BUFFER_ATTR, buf)
    compiled = _compile_like_vllm(o, "inductor")
    for grants, counts in [([PUBLIC_BIT | 2], [3]), ([PUBLIC_BIT], [3]),
                           ([PUBLIC_BIT | 2, PUBLIC_BIT, PUBLIC_BIT | 3], [2, 4, 1]),
                           ([PUBLIC_BIT | 1], [12]), ([PUBLIC_BIT | 2], [1])]:
        state.fill(grants, np.array(counts))
        x = torch.randn(sum(counts), D)
        torch._dynamo.mark_dynamic(x, 0)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), _o_proj_reference(o, x, buf))


def test_compiled_fp16_closed_head_reads_zero_even_when_it_is_inf(monkeypatch):
    import numpy as np

    torch._dynamo.reset()
    state = GrantState()
    monkeypatch.setattr(layer, "STATE", state)
    buf = state.ensure_buffer(16)
    o = OProj(D, 2, bias=False).to(torch.float16)
    nn.init.zeros_(o.weight)
    o.guard_table_rows, o.guard_table_dtype = 3, torch.float16
    setattr(o, HEAD_BITS_ATTR, _head_bits())
    setattr(o, GRANT_BUFFER_ATTR, buf)
    compiled = _compile_like_vllm(o, "inductor")
    state.fill([PUBLIC_BIT], np.array([2]))
    x = torch.zeros(2, D, dtype=torch.float16)
    x[:, 16:] = torch.inf  # a closed head's output: must not turn the product into NaN
    torch._dynamo.mark_dynamic(x, 0)
    with torch.no_grad():
        assert torch.count_nonzero(compiled(x)) == 0
