"""The per-neuron task bit table: per layer, one int64 per FFN neuron, bit ``t`` set if task
``t`` may use it, every bit set for public neurons. The loader builds it from a manifest,
lock-aware training from the selection it will lock (the same table). Sealed heads get the
same kind of table over the o_proj input columns (:func:`head_bits`)."""

from __future__ import annotations

import torch

from vllm_guard.errors import ManifestError
from vllm_guard.secneuron.manifest import Group, Manifest
from vllm_guard.secneuron.selection import Selection, policy_tree

ALL_BITS = -1  # int64 with every bit set: public neurons serve every grant


def _bits_table(sizes: dict[int, int], groups: list[Group],
                task_bit: dict[str, int]) -> dict[int, torch.Tensor]:
    bits = {layer: torch.full((size,), ALL_BITS, dtype=torch.int64)
            for layer, size in sizes.items()}
    for group in groups:
        mask = sum(1 << task_bit[t] for t in group.policy)
        for layer, idx in group.neurons.items():
            bits[layer][torch.tensor(idx, dtype=torch.long)] = mask
    return bits


def neuron_bits(manifest: Manifest) -> dict[int, torch.Tensor]:
    """Per layer, int64 per neuron: bit t set if task t may use it; all bits for public ones."""
    return _bits_table({layer: info.intermediate_size for layer, info in manifest.layers.items()},
                       manifest.groups, manifest.tasks)


def selection_bits(selection: Selection, intermediate_size: int) -> dict[int, torch.Tensor]:
    """The :func:`neuron_bits` table that locking ``selection`` will produce (same task bits)."""
    return _bits_table({layer: intermediate_size for layer in selection.neurons},
                       policy_tree(selection), {t: i for i, t in enumerate(selection.tasks)})


def head_bits(manifest: Manifest) -> dict[int, torch.Tensor]:
    """Per layer with sealed heads, int64 per o_proj input column: the owning group's task
    bits on its heads' columns, every bit elsewhere. Every sealed group, open or not: heads
    left locked are zero weights, but masking them anyway keeps the traced graph the same
    whichever keys a server holds (a compiled graph cached by a start without a key must
    not serve opened heads unmasked after a restart with it)."""
    groups = [g for g in manifest.groups if any(g.attn.values())]
    sizes: dict[int, int] = {}
    for g in groups:
        for layer, cols in g.attn.items():
            o_proj = [sl for sl in g.slices if sl.layer == layer
                      and sl.tensor.endswith("self_attn.o_proj.weight")]
            if cols and not o_proj:
                raise ManifestError(f"group {g.id} seals heads of layer {layer} but not their "
                                    "o_proj columns")
            for sl in o_proj:
                sizes[layer] = sl.shape[1]  # [hidden, heads * head_dim]
    bits = {layer: torch.full((size,), ALL_BITS, dtype=torch.int64)
            for layer, size in sizes.items()}
    for g in groups:
        mask = sum(1 << manifest.tasks[t] for t in g.policy)
        for layer, cols in g.attn.items():
            if cols:
                bits[layer][cols[0]:cols[-1] + 1] = mask  # one block (check_attention)
    return bits
