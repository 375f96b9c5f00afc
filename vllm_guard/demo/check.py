"""Does the built model meet the demo's bar? Exact match per task under a grant, offline.

The check runs on the lock-aware model with the grant's neuron mask, which is what the
server computes for a request (all keys loaded, per-request masks), so a build that would
not visibly lock is never cached. Teacher-forced: an answer counts when the argmax at every
answer position, EOS included, is the reference token, i.e. greedy decoding returns exactly
the answer and stops, in one forward pass per batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_guard.secneuron.examples import AnswerBatcher, Example
from vllm_guard.secneuron.neuron_bits import selection_bits
from vllm_guard.secneuron.selection import Selection
from vllm_guard.secneuron.train import neuron_mask


@torch.no_grad()
def _correct(model, batcher: AnswerBatcher, rows: Sequence[Example]) -> torch.Tensor:
    ids, labels = batcher.encode(list(rows))
    target = labels[:, 1:]
    hit = model(input_ids=ids).logits[:, :-1].argmax(-1) == target
    return (hit | (target == -100)).all(1)


def grant_accuracy(model, tokenizer, selection: Selection, granted: Sequence[str],
                   examples: dict[str, Sequence[Example]]) -> dict[str, float]:
    """Exact-match rate per task of ``examples`` when only ``granted`` tasks are unlocked."""
    bits = selection_bits(selection, model.config.intermediate_size)
    grant = sum(1 << selection.tasks.index(t) for t in granted)
    batcher = AnswerBatcher(tokenizer)
    out = {}
    for task, rows in examples.items():
        with neuron_mask(model, bits, torch.full((len(rows),), grant, dtype=torch.int64)):
            out[task] = _correct(model, batcher, rows).float().mean().item()
    return out
