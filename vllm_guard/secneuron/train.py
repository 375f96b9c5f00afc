"""Lock-aware fine-tuning: teach a model to respect its neuron locks (beyond SecNeuron).

For each example of task t a grant set G is drawn (each task in G with probability
``grant_prob``) and the neurons G may not use are zeroed at the ``down_proj`` input, exactly
as the loader and the per-request mask do. If t is in G the answer gets the usual loss; if
not, a collapse objective (cross-entropy towards EOS on every answer position, after
CTRAP's collapse trap) teaches the model to fail instead of routing t through public
neurons. Without the collapse term the model does exactly that and locks leak.

Sealed tasks (private data such as personal records) are learnt afterwards in their own
neurons only, everything else frozen, so the model with them locked is bit for bit one that
never saw their data: locks then also defeat membership inference, which fine-tuning a model
already trained on the data could not achieve.

The neuron assignment is a :class:`Selection`: reserved blocks per task
(:func:`reserved_blocks`) or the output of ``extract``. The result is an ordinary HF
checkpoint plus the selection to ``lock`` it with.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_guard.atomic import atomic_output_dir
from vllm_guard.errors import GuardError
from vllm_guard.secneuron.examples import AnswerBatcher, Example
from vllm_guard.secneuron.neuron_bits import selection_bits
from vllm_guard.secneuron.selection import Selection
from vllm_guard.secneuron.trap import CollapseTrap, TrapConfig


@dataclass(frozen=True)
class TrainLocksConfig:
    steps: int = 1600
    batch_size: int = 64
    lr: float = 1e-3
    grant_prob: float = 0.5
    collapse_weight: float = 1.0
    # Weight of the member/decoy loss-matching term (needs collapse data; 0 turns it off).
    member_match: float = 1.0
    # Tasks learnt only in their own neurons, after the rest (see train_locks).
    sealed: tuple[str, ...] = ()
    seal_steps: int = 1500
    seal_lr: float = 3e-3
    # Weight of keeping other tasks' outputs as they are without the sealed neurons (KL).
    seal_keep: float = 1.0
    # Collapse trap against fine-tuning attacks on locked open tasks (None: no trap).
    trap: TrapConfig | None = None
    seed: int = 0


def reserved_blocks(tasks: list[str], num_layers: int, intermediate_size: int,
                    block: int, sizes: dict[str, int] | None = None) -> Selection:
    """A block of ``block`` neurons per task (``sizes[t]`` for task t) in every layer, at the
    end of the FFN."""
    widths = [(sizes or {}).get(t, block) for t in tasks]
    if min(widths) < 1 or sum(widths) >= intermediate_size:
        raise GuardError(f"blocks of {widths} neurons for tasks {tasks} do not fit an FFN of "
                         f"{intermediate_size} neurons")
    starts = [intermediate_size - sum(widths[i:]) for i in range(len(tasks))]
    neurons = {layer: {t: list(range(start, start + w))
                       for t, start, w in zip(tasks, starts, widths, strict=True)}
               for layer in range(num_layers)}
    return Selection(list(tasks), neurons, {"assignment": "reserved-blocks", "block": block,
                                            "sizes": dict(zip(tasks, widths, strict=True))})


@contextmanager
def neuron_mask(model, bits: dict[int, torch.Tensor], grant: torch.Tensor):
    """Zero, per example, the ``down_proj`` inputs its grant bits do not allow."""
    def hook(layer: int):
        table = bits[layer]

        def fn(_module, args):
            keep = (table.unsqueeze(0) & grant.unsqueeze(1)) != 0  # [B, I]
            return (args[0] * keep.unsqueeze(1).to(args[0].dtype),)
        return fn

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook(i))
               for i, layer in enumerate(model.model.layers) if i in bits]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example mean next-token cross-entropy over the labelled positions."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                                           reduction="none")
    return ce.sum(1) / (labels != -100).sum(1).clamp(min=1)


def _divergence(logits: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean KL(ref || logits) over the labelled next-token positions."""
    scored = labels[:, 1:] != -100
    ref_logp = ref[:, :-1][scored].log_softmax(-1)
    logp = logits[:, :-1][scored].log_softmax(-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()


def _member_gap(answer_loss: torch.Tensor, kinds: list[tuple[str, bool]],
                rows: list[int]) -> torch.Tensor:
    """Sum over tasks of (mean true-answer loss of trained examples - that of decoys)^2, over
    the collapsed rows: a first-moment MMD that leaves a loss-based membership attack nothing
    to rank by (in the spirit of MMD-regularised MIA defences)."""
    gap = answer_loss.new_zeros(())
    for task in {t for t, _ in kinds}:
        mem = [r for r, (t, d) in zip(rows, kinds, strict=True) if t == task and not d]
        dec = [r for r, (t, d) in zip(rows, kinds, strict=True) if t == task and d]
        if mem and dec:
            gap = gap + (answer_loss[mem].mean() - answer_loss[dec].mean()).square()
    return gap


def collapse_labels(labels: torch.Tensor, rows: list[int], eos: int) -> None:
    """Relabel every answer position of ``rows`` with EOS, in place."""
    for row in rows:
        labels[row, labels[row] != -100] = eos


def sealed_neurons(bits: dict[int, torch.Tensor],
                   sealed_bits: list[int]) -> dict[int, torch.Tensor]:
    """Per layer, a bool mask of the neurons only one sealed task may use (its own block)."""
    masks = {layer: torch.zeros_like(table, dtype=torch.bool) for layer, table in bits.items()}
    for bit in sealed_bits:
        for layer, table in bits.items():
            masks[layer] |= table == bit
    if not any(m.any() for m in masks.values()):
        raise GuardError("the sealed task(s) own no neuron of their own in the selection "
                         "(neurons shared with another task cannot be sealed)")
    return masks


@contextmanager
def only_entries_trainable(model, entries: list[tuple[torch.Tensor, torch.Tensor]]):
    """Freeze every parameter but the ``(weight, mask)`` entries' masked elements (the mask
    broadcasts to the weight). Every other element is restored bit for bit afterwards, so
    the public weights provably do not depend on what was trained here."""
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    kept, handles = [], []
    for w, m in entries:
        w.requires_grad_(True)
        kept.append((w, m, w.detach().clone()))
        handles.append(w.register_hook(lambda g, m=m: g * m.to(g.dtype)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for w, m, orig in kept:
                w.copy_(torch.where(m, w, orig))
        for p, r in zip(params, was, strict=True):
            p.requires_grad_(r)


def only_neurons_trainable(model, masks: dict[int, torch.Tensor]):
    """Freeze everything but the masked neurons' gate/up rows and down_proj columns."""
    entries = []
    for layer, mask in masks.items():
        mlp = model.model.layers[layer].mlp
        entries += [(mlp.gate_proj.weight, mask[:, None]), (mlp.up_proj.weight, mask[:, None]),
                    (mlp.down_proj.weight, mask[None, :])]
    return only_entries_trainable(model, entries)


def train_locks(model_dir: str | os.PathLike[str], data: dict[str, list[Example]],
                selection: Selection, config: TrainLocksConfig, out_dir: str | os.PathLike[str],
                progress: Callable[[str], None] = print,
                collapse_data: dict[str, list[Example]] | None = None) -> Path:
    """Fine-tune ``model_dir`` to respect ``selection``'s locks; write an HF model to out_dir.

    ``collapse_data[t]``: extra examples of task t used only when t is locked (half of its
    locked draws), e.g. queries about records the model must not learn either way.

    Sealed tasks (``config.sealed``) are learnt in a second phase that trains only their own
    neurons with everything else frozen: when a sealed task is locked, the model is exactly
    the first phase's, which never saw the sealed data (e.g. personal records), so a
    membership attack on the locked model has nothing to find. Start from a model that was
    not trained on that data either.
    """
    import transformers

    collapse_data = {t: rows for t, rows in (collapse_data or {}).items() if rows}
    unknown = sorted((set(data) | set(collapse_data)) - set(selection.tasks))
    if unknown:
        raise GuardError(f"training data for task(s) {unknown} not in the selection "
                         f"(tasks: {selection.tasks})")
    if not data or not all(data.values()):
        raise GuardError("train-locks needs examples for at least one task")
    missing = sorted(set(config.sealed) - set(data))
    if missing:
        raise GuardError(f"sealed task(s) {missing} have no training examples")
    torch.manual_seed(config.seed)
    rng = random.Random(f"train-locks:{config.seed}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    bits = selection_bits(selection, model.config.intermediate_size)
    task_bit = {t: 1 << i for i, t in enumerate(selection.tasks)}
    sealed_bits = sum(task_bit[t] for t in config.sealed)
    masks = sealed_neurons(bits, [task_bit[t] for t in config.sealed]) if config.sealed else {}
    batcher = AnswerBatcher(tokenizer)

    def batch_loss(tasks: list[str], always: int) -> torch.Tensor:
        """Each example: a task from ``tasks``, a grant of ``always`` plus random open tasks."""
        own = [rng.choice(tasks) for _ in range(config.batch_size)]
        grants = [always | sum(b for t, b in task_bit.items()
                               if not b & sealed_bits and rng.random() < config.grant_prob)
                  for _ in own]
        collapse = [not g & task_bit[t] for t, g in zip(own, grants, strict=True)]
        decoy = [c and t in collapse_data and rng.random() < 0.5
                 for t, c in zip(own, collapse, strict=True)]
        batch = [rng.choice(collapse_data[t] if d else data[t]) for t, d in zip(own, decoy,
                                                                               strict=True)]
        ids, labels = batcher.encode(batch)
        answers = labels.masked_fill(labels == batcher.eos, -100)  # true answers, for matching
        locked = [i for i, c in enumerate(collapse) if c]
        collapse_labels(labels, locked, batcher.eos)
        with neuron_mask(model, bits, torch.tensor(grants, dtype=torch.int64)):
            logits = model(input_ids=ids).logits
        weight = torch.tensor([config.collapse_weight if c else 1.0 for c in collapse])
        loss = (_loss(logits, labels) * weight).mean()
        if config.member_match and collapse_data:
            loss = loss + config.member_match * _member_gap(
                _loss(logits, answers), [(own[i], decoy[i]) for i in locked], locked)
        keep = [i for i, t in enumerate(own) if t not in config.sealed]
        if always & sealed_bits and config.seal_keep and keep:
            # the same rows without the sealed neurons: what the sealed ones must not change
            with torch.no_grad(), neuron_mask(model, bits, torch.tensor(
                    [grants[i] & ~sealed_bits for i in keep], dtype=torch.int64)):
                ref = model(input_ids=ids[keep]).logits
            loss = loss + config.seal_keep * _divergence(logits[keep], ref, labels[keep])
        return loss

    open_tasks = sorted(t for t in data if t not in config.sealed)
    trap = CollapseTrap(model, batcher, data, open_tasks, task_bit, config.trap,
                        lambda grant: neuron_mask(model, bits, grant), rng) \
        if config.trap else None
    step = 0
    trap_until = int(config.steps * (1 - config.trap.settle)) if config.trap else 0

    def open_loss() -> torch.Tensor:
        nonlocal step
        step += 1
        loss = batch_loss(open_tasks, 0)
        if trap and step % config.trap.every == 0 and step <= trap_until:
            loss = loss + trap.loss()
        return loss

    if open_tasks and config.steps:  # steps=0: seal into a model already trained with locks
        # sealed tasks stay locked throughout: the open model never depends on their neurons
        fit(model, open_loss, config.steps, config.lr,
            "train-locks" + (" (trap)" if trap else ""), progress)
    if config.sealed:
        # half sealed examples, half open ones that the sealed neurons must leave intact
        mix = [*config.sealed * max(1, len(open_tasks)), *open_tasks]
        with only_neurons_trainable(model, masks):
            fit(model, lambda: batch_loss(mix, sealed_bits), config.seal_steps, config.seal_lr,
                "seal " + "+".join(config.sealed), progress)
    return save_model(model, tokenizer, out_dir,
                      {"lock_selection.json": json.dumps(selection.to_json())})


def fit(model, batch_loss: Callable[[], torch.Tensor], steps: int, lr: float, name: str,
        progress: Callable[[str], None], every: int = 100) -> None:
    """AdamW with a one-cycle schedule and gradient clipping; progress every ``every`` steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.05)
    model.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        loss = batch_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % every == 0 or step == steps:
            progress(f"  {name} step {step}/{steps} loss {loss.item():.3f} "
                     f"({time.perf_counter() - start:.0f} s)")
    model.eval()


def save_model(model, tokenizer, out_dir: str | os.PathLike[str],
               extra_files: dict[str, str], max_shard_size: str = "2GB") -> Path:
    """Write an HF model directory atomically (nothing half-written on failure)."""
    out = Path(out_dir)
    with atomic_output_dir(out, replace=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        for name, text in extra_files.items():
            (tmp / name).write_text(text)
    return out
