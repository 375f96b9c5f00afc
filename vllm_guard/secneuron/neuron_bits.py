"""The per-neuron task bit table: per layer, one int64 per FFN neuron, bit ``t`` set if task
``t`` may use it, every bit set for public neurons. The loader builds it from a manifest,
lock-aware training from the selection it will lock (the same table)."""

from __future__ import annotations

import torch

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
