"""vLLM integration of the masked activation (an out-of-tree ``SiluAndMul``) and of the
sealed heads' mask (an out-of-tree ``RowParallelLinear``, masking the o_proj input).

Registered with ``register_oot`` only when per-request grants are on, so every
Llama/Qwen2/Mistral MLP builds this class instead. It overrides ``forward`` itself, which
bypasses vLLM's CustomOp dispatch (forward_native/forward_cpu/forward_cuda and whether
custom ops are enabled under the compile config), and picks the form by mode:
- traced by torch.compile (vLLM's default): a multiply by the layer's keep table gathered
  by each token's row, which Inductor fuses with ``silu * mul``; the table (made when the
  loader attaches the neuron table) and the rows are filled in place by the runner hook and
  read at run time every step (``GrantState.add_table``, ``masked_silu_and_mul_rows``);
- eager (``--enforce-eager``): the planned torch path on CPU, the Triton kernel on GPUs,
  called directly (no custom-op dispatch, which cost more than the masking at 1 token).
"""

from __future__ import annotations

import torch

from vllm_guard.kernels.masked_silu import (
    mask_columns_,
    mask_columns_rows,
    masked_silu_and_mul,
    masked_silu_and_mul_rows,
    register_custom_op,
)
from vllm_guard.runtime import GRANT_BUFFER_ATTR, HEAD_BITS_ATTR, NEURON_BITS_ATTR
from vllm_guard.runtime.grant_state import STATE

DEFAULT_BUFFER_TOKENS = 8192
KEEP_TABLE_ATTR = "guard_keep_table"  # the compiled form's per-layer keep table

_registered = False


def _table_rows() -> int:
    """Rows of a keep table in compile mode (a step has at most one grant set per request,
    plus the public row), 0 in eager mode, which does not use them."""
    from vllm.config import CompilationMode, get_current_vllm_config_or_none

    cfg = get_current_vllm_config_or_none()
    if cfg is None or cfg.compilation_config.mode == CompilationMode.NONE:
        return 0
    return cfg.scheduler_config.max_num_seqs + 1


def _buffer_tokens() -> int:
    from vllm.config import get_current_vllm_config_or_none

    cfg = get_current_vllm_config_or_none()
    if cfg is None:
        return DEFAULT_BUFFER_TOKENS
    sched = cfg.scheduler_config
    return max(sched.max_num_batched_tokens, sched.max_num_seqs, DEFAULT_BUFFER_TOKENS)


class KeepTableOwner:
    """Makes the compiled form's keep table when the loader attaches the bit table named
    ``guard_bits_attr`` (before any graph is traced: its identity is what graphs hold)."""

    guard_bits_attr = NEURON_BITS_ATTR
    guard_table_rows = 0  # > 0: compile mode; the keep table's rows
    guard_table_dtype = torch.float32  # the activation dtype (vLLM's default while building)

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if (name == self.guard_bits_attr and isinstance(value, torch.Tensor)
                and self.guard_table_rows):  # the loader attached a table: make its keep table
            super().__setattr__(KEEP_TABLE_ATTR, STATE.add_table(
                self, value, self.guard_table_rows, self.guard_table_dtype))

    def guard_setup(self) -> None:
        """What the vLLM subclasses run after their own ``__init__``."""
        # Made under vLLM's target device; the loader moves it if needed (runtime/).
        setattr(self, GRANT_BUFFER_ATTR, STATE.ensure_buffer(_buffer_tokens()))
        self.guard_table_rows = _table_rows()
        self.guard_table_dtype = torch.get_default_dtype()  # vLLM's model dtype here


class MaskedForward(KeepTableOwner):
    """The forward of the masked activation; a mixin so it is testable without vLLM's
    ``SiluAndMul`` (the class using it must provide ``forward_native``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bits = getattr(self, NEURON_BITS_ATTR, None)
        if bits is None:  # not a secneuron checkpoint: nothing to mask
            return self.forward_native(x)  # type: ignore[attr-defined]
        grants = getattr(self, GRANT_BUFFER_ATTR)
        if torch.compiler.is_compiling():
            table = getattr(self, KEEP_TABLE_ATTR, None)
            if table is not None and STATE.rows is not None:
                return masked_silu_and_mul_rows(x, table, STATE.rows)
            return torch.ops.vllm.guard_masked_silu_and_mul(x, bits, grants)
        return masked_silu_and_mul(x, bits, grants)


class MaskedInputForward(KeepTableOwner):
    """A linear layer whose input columns are masked per token: the o_proj of a layer with
    sealed heads (a sealed capability, secneuron/capability.py) gets, from the loader, a bit
    table over its input columns (``HEAD_BITS_ATTR``: the owning task's bit on the heads'
    columns, every bit elsewhere), so a token whose grant lacks the task computes exactly
    what the public model does: the heads' outputs never reach the residual stream. The
    heads' K/V are still computed and cached for every token; the per-grant-set prefix-cache
    salt keeps cached blocks from crossing grant sets. A mixin (testable without vLLM): the
    class using it must be a module whose ``forward`` takes the input first."""

    guard_bits_attr = HEAD_BITS_ATTR

    def forward(self, x: torch.Tensor, *args, **kwargs):  # noqa: ANN201 - the layer's return
        bits = getattr(self, HEAD_BITS_ATTR, None)
        if bits is not None:
            grants = getattr(self, GRANT_BUFFER_ATTR)
            shape = x.shape
            flat = x.reshape(-1, shape[-1])  # one row per token (vLLM's layout: a view)
            if not torch.compiler.is_compiling():
                flat = mask_columns_(flat, bits, grants)  # in place: o_proj's input is its own
            elif (table := getattr(self, KEEP_TABLE_ATTR, None)) is not None \
                    and STATE.rows is not None:
                flat = mask_columns_rows(flat, table, STATE.rows)
            else:  # traced without a keep table: the bit test on the buffer, read at run time
                flat = torch.where((bits & grants[: flat.shape[0], None]) != 0, flat, 0)
            x = flat.view(shape)
        return super().forward(x, *args, **kwargs)  # type: ignore[misc]


def register_masked_layers() -> None:
    """The masked activation and the masked o_proj input, for every model vLLM builds."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.activation import SiluAndMul
    from vllm.model_executor.layers.linear import RowParallelLinear

    register_custom_op()

    class GuardSiluAndMul(MaskedForward, SiluAndMul):
        """SiluAndMul masked by ``(neuron_bits & grant[token]) != 0``."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.guard_setup()

    class GuardRowParallelLinear(MaskedInputForward, RowParallelLinear):
        """RowParallelLinear whose input is masked by ``(head_bits & grant[token]) != 0``
        where the loader attached head bits (o_proj of layers with sealed heads); a plain
        RowParallelLinear everywhere else (down_proj: one attribute lookup)."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.guard_setup()

    SiluAndMul.register_oot(GuardSiluAndMul)
    RowParallelLinear.register_oot(GuardRowParallelLinear)
    _registered = True
