"""Per-request grants in the worker: task -> bit, the per-token grant buffer, the step plan.

Each step, after vLLM's V1 model runner prepares its inputs, the task bits of every scheduled
request are written per token into one preallocated int64 buffer (fixed identity, updated in
place: what a once-traced torch.compile graph and a CUDA graph can see). The GPU kernel reads
it directly. For the CPU path the hook also plans the step once (:class:`StepPlan`: the
distinct grants and each token's row), so the N layers do no per-step analysis of their own;
each layer keeps, per grant, which of its neurons it may use (:meth:`GrantState.keep_row`).
Tokens of requests without a verified grant, and padding, get :data:`PUBLIC_BIT` only.
For compiled graphs the hook also fills a second fixed buffer, each token's row into the
layers' keep tables (row 0: public only), and rewrites those tables when the step's grant
sets change (:meth:`GrantState.add_table`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import torch

from vllm_guard.runtime import PUBLIC_BIT

MAX_CACHED_ROWS = 4096  # (table, grant, dtype) rows; a few API keys x layers in practice


@dataclass(frozen=True)
class StepPlan:
    """What depends only on the batch, computed once per step by the runner hook.

    A request's tokens are contiguous in vLLM's flattened batch, so the step is a few runs
    of one grant each (adjacent requests with the same grant merged)."""

    tokens: int
    grants: tuple[int, ...]  # distinct grant bit-sets of the step, sorted
    runs: tuple[tuple[int, int, int], ...]  # (start, end, index into grants)
    rows: torch.Tensor  # int64 [tokens]: each token's index into ``grants``


# A layer's masking passes under one plan, (start, end, kind, tensor) each (see
# kernels.masked_silu._masking), keyed by (id of its neuron table, the table's in-place
# version, output dtype).
MaskingSteps: TypeAlias = tuple[tuple[int | None, int | None, str, Any], ...]
StepMemo: TypeAlias = dict[tuple[int, int, torch.dtype], MaskingSteps]


class GrantState:
    """Process-wide: task -> bit (from the loaded manifest), the per-token grant buffer, the
    current step's plan and the per-table keep rows."""

    def __init__(self) -> None:
        self.task_bits: dict[str, int] = {}
        self.buffer: torch.Tensor | None = None
        self.filled = 0
        self.plan: StepPlan | None = None
        self._keep: dict[tuple, torch.Tensor | None] = {}
        # What each layer does under the current plan, keyed by the caller (the masked op):
        # kept while consecutive steps have the same grants and runs (decode), so a layer's
        # call is one dict lookup rather than a plan check and a cache lookup per grant.
        self.memo: StepMemo = {}
        # The compiled form's inputs (kernels.masked_silu.masked_silu_and_mul_rows): each
        # token's row into every layer's keep table (0: public only), and the tables.
        self.rows: torch.Tensor | None = None
        self._tables: list[tuple[weakref.ref, torch.Tensor, torch.Tensor]] = []
        self._table_grants: tuple[int, ...] | None = None
        self._table_versions: tuple[int, ...] = ()
        self._rows_filled = 0

    def ensure_buffer(self, size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The grant buffer (made once: its identity is what compiled graphs capture)."""
        if self.buffer is None:
            self.buffer = torch.full((size,), PUBLIC_BIT, dtype=torch.int64, device=device)
            self.rows = torch.zeros((size,), dtype=torch.int64, device=device)
        return self.buffer

    def place_buffer(self, device: torch.device) -> torch.Tensor:
        """Move the buffer to ``device`` if it was made elsewhere (vLLM builds the model under
        its target device but may have made the buffer before). Called at load time, before
        any graph is captured; the caller re-points its layers at the returned tensor."""
        if self.buffer is None:
            raise RuntimeError("no grant buffer: the masked activation was never built")
        if self.buffer.device != device:
            self.buffer = self.buffer.to(device)
            self.rows = self.rows.to(device) if self.rows is not None else None
        return self.buffer

    def bits_for(self, grant: str | None) -> int:
        """Task bits of a grant string; unknown tasks grant nothing (default deny)."""
        bits = PUBLIC_BIT
        for task in (grant or "").split(","):
            if task in self.task_bits:
                bits |= 1 << self.task_bits[task]
        return bits

    def fill(self, per_request_bits: list[int], num_tokens: np.ndarray) -> None:
        buf = self.buffer
        if buf is None:
            return
        tokens = np.repeat(np.asarray(per_request_bits, dtype=np.int64), num_tokens)
        n = len(tokens)
        if n > buf.shape[0]:
            raise RuntimeError(f"{n} tokens in a step, grant buffer holds {buf.shape[0]}")
        buf[:n].copy_(torch.from_numpy(tokens), non_blocking=True)
        if self.filled > n:
            buf[n:self.filled].fill_(PUBLIC_BIT)
        self.filled = n
        plan, old = plan_step(per_request_bits, num_tokens, n), self.plan
        if old is None or plan.runs != old.runs or plan.grants != old.grants:
            self.memo.clear()
        self.plan = plan
        if self._tables and self.rows is not None:
            self._fill_rows(plan, n)

    def add_table(self, owner: object, neuron_bits: torch.Tensor, rows: int,
                  dtype: torch.dtype) -> torch.Tensor:
        """A keep table for the compiled form: ``dtype`` [rows, I], row 0 the public neurons,
        rows 1.. the current step's grants (rewritten by :meth:`fill` when they change, or
        when ``neuron_bits`` is rewritten in place). Made once per table, before any graph
        is traced: its identity is what the graph holds."""
        keep = self.keep_row(neuron_bits, PUBLIC_BIT, dtype)
        table = torch.empty((rows, neuron_bits.shape[0]), dtype=dtype,
                            device=neuron_bits.device)
        table[:] = 1 if keep is None else keep  # default deny until a step says otherwise
        self._tables = [t for t in self._tables if t[0]() not in (None, owner)]
        self._tables.append((weakref.ref(owner), neuron_bits, table))
        self._table_grants = None
        return table

    def _fill_rows(self, plan: StepPlan, n: int) -> None:
        rows = self.rows
        assert rows is not None
        rows[:n].copy_(plan.rows + 1, non_blocking=True)
        if self._rows_filled > n:
            rows[n:self._rows_filled].zero_()  # padding: public neurons only
        self._rows_filled = n
        versions = tuple(bits._version for _, bits, _ in self._tables)
        if plan.grants == self._table_grants and versions == self._table_versions:
            return  # decode: same grants as the last step, tables as they are
        for _, bits, table in self._tables:
            if len(plan.grants) + 1 > table.shape[0]:
                raise RuntimeError(f"{len(plan.grants)} grant sets in a step, keep tables "
                                   f"hold {table.shape[0] - 1}")
            for i, grant in enumerate((PUBLIC_BIT, *plan.grants)):
                keep = self.keep_row(bits, grant, table.dtype)
                table[i] = 1 if keep is None else keep
        self._table_grants, self._table_versions = plan.grants, versions

    def step_plan(self, tokens: int, grants: torch.Tensor) -> tuple[StepPlan, StepMemo | None]:
        """The plan for a layer call over ``tokens`` tokens reading ``grants``, and
        :attr:`memo`. The hook's plan and memo when it describes exactly this buffer and
        token count; otherwise (direct calls, dummy runs, padding) a plan derived from
        ``grants`` itself and no memo (what a layer does under it is not worth keeping)."""
        plan, buf = self.plan, self.buffer
        if (plan is not None and plan.tokens == tokens and buf is not None
                and (grants is buf or grants.data_ptr() == buf.data_ptr())):
            return plan, self.memo
        values, counts = torch.unique_consecutive(grants[:tokens], return_counts=True)
        return make_plan(values.cpu().numpy(), counts.cpu().numpy()), None

    def keep_row(self, neuron_bits: torch.Tensor, grant: int,
                 dtype: torch.dtype) -> torch.Tensor | None:
        """``dtype`` [I]: 1 where ``grant`` may use the neuron, 0 where not; None when it may
        use them all. Cached per (table, its in-place version, grant, dtype): multiplying by
        it is the CPU masking pass for fp32 and bf16 outputs (faster than zeroing columns;
        see kernels.masked_silu._masking); fp16 zeroes columns instead (closed_index)."""
        return self._cached(neuron_bits, grant, dtype, lambda keep: keep.to(dtype))

    def closed_index(self, neuron_bits: torch.Tensor, grant: int) -> torch.Tensor | None:
        """int64 indices of the neurons ``grant`` may not use; None when it may use them
        all. Used for fp16 outputs only: zeroing these columns gives 0 where a multiply by 0
        would turn an overflowed activation (inf) into NaN. It is slower than the multiply."""
        return self._cached(neuron_bits, grant, "closed",
                            lambda keep: (~keep).nonzero().flatten())

    def _cached(self, neuron_bits: torch.Tensor, grant: int, kind: object,
                build: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
        key = (id(neuron_bits), neuron_bits._version, grant, kind)
        if key in self._keep:
            return self._keep[key]
        if len(self._keep) >= MAX_CACHED_ROWS:
            self._keep.clear()
        if not any(k[0] == key[0] for k in self._keep):  # forget a table when it is freed
            weakref.finalize(neuron_bits, self._forget, key[0])
        keep = (neuron_bits & torch.tensor(_signed(grant), dtype=torch.int64,
                                           device=neuron_bits.device)) != 0
        row = None if bool(keep.all()) else build(keep)
        self._keep[key] = row
        return row

    def _forget(self, table_id: int) -> None:
        for k in [k for k in self._keep if k[0] == table_id]:
            del self._keep[k]
        for k in [k for k in self.memo if k[0] == table_id]:  # ids are reused
            del self.memo[k]


def _signed(bits: int) -> int:
    """An int64 bit pattern as a Python int torch accepts (bit 63 set -> negative)."""
    return bits - (1 << 64) if bits >= 1 << 63 else bits


def plan_step(per_request_bits: list[int], num_tokens: np.ndarray, n: int) -> StepPlan:
    plan = make_plan(np.asarray(per_request_bits, dtype=np.int64),
                     np.asarray(num_tokens, dtype=np.int64))
    assert plan.tokens == n
    return plan


def make_plan(bits: np.ndarray, counts: np.ndarray) -> StepPlan:
    """Runs of (grant, token count) in batch order -> distinct grants, merged runs, rows."""
    uniq, inv = np.unique(bits, return_inverse=True)
    ends = np.cumsum(counts)
    runs: list[tuple[int, int, int]] = []
    start = 0
    for gi, end in zip(inv.tolist(), ends.tolist(), strict=True):
        if end == start:
            continue
        if runs and runs[-1][2] == gi and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end, gi)
        else:
            runs.append((start, end, gi))
        start = end
    rows = torch.from_numpy(np.repeat(inv.astype(np.int64), counts))
    return StepPlan(int(start), tuple(int(v) for v in uniq), tuple(runs), rows)


STATE = GrantState()
