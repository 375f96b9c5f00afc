"""Lock-aware fine-tuning: teach a model to respect its neuron locks (beyond SecNeuron).

For each example of task t a grant set G is drawn (each task in G with probability
``grant_prob``) and the neurons G may not use are zeroed at the ``down_proj`` input, exactly
as the loader and the per-request mask do. If t is in G the answer gets the usual loss; if
not, a collapse objective (cross-entropy towards EOS on every answer position, after
CTRAP's collapse trap) teaches the model to fail instead of routing t through public
neurons. Without the collapse term the model does exactly that and locks leak.

The neuron assignment is a :class:`Selection`: reserved blocks per task
(:func:`reserved_blocks`) or the output of ``extract``. The result is an ordinary HF
checkpoint plus the selection to ``lock`` it with.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_guard.errors import GuardError
from vllm_guard.secneuron.examples import AnswerBatcher, Example
from vllm_guard.secneuron.lock import Selection, selection_bits


@dataclass(frozen=True)
class TrainLocksConfig:
    steps: int = 1600
    batch_size: int = 64
    lr: float = 1e-3
    grant_prob: float = 0.5
    collapse_weight: float = 1.0
    # Weight of the member/decoy loss-matching term (needs collapse data; 0 turns it off).
    member_match: float = 1.0
    seed: int = 0


def reserved_blocks(tasks: list[str], num_layers: int, intermediate_size: int,
                    block: int) -> Selection:
    """A block of ``block`` neurons per task in every layer, at the end of the FFN."""
    if block < 1 or block * len(tasks) >= intermediate_size:
        raise GuardError(f"--block {block} x {len(tasks)} tasks does not fit an FFN of "
                         f"{intermediate_size} neurons")
    base = intermediate_size - block * len(tasks)
    neurons = {layer: {t: list(range(base + i * block, base + (i + 1) * block))
                       for i, t in enumerate(tasks)} for layer in range(num_layers)}
    return Selection(list(tasks), neurons, {"assignment": "reserved-blocks", "block": block})


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


def train_locks(model_dir: str | os.PathLike[str], data: dict[str, list[Example]],
                selection: Selection, config: TrainLocksConfig, out_dir: str | os.PathLike[str],
                progress: Callable[[str], None] = print,
                collapse_data: dict[str, list[Example]] | None = None) -> Path:
    """Fine-tune ``model_dir`` to respect ``selection``'s locks; write an HF model to out_dir.

    ``collapse_data[t]``: extra examples of task t used only when t is locked (half of its
    locked draws), e.g. queries about records the model must not learn either way.
    """
    import transformers

    collapse_data = {t: rows for t, rows in (collapse_data or {}).items() if rows}
    unknown = sorted((set(data) | set(collapse_data)) - set(selection.tasks))
    if unknown:
        raise GuardError(f"training data for task(s) {unknown} not in the selection "
                         f"(tasks: {selection.tasks})")
    if not data or not all(data.values()):
        raise GuardError("train-locks needs examples for at least one task")
    torch.manual_seed(config.seed)
    rng = random.Random(f"train-locks:{config.seed}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    bits = selection_bits(selection, model.config.intermediate_size)
    task_bit = {t: 1 << i for i, t in enumerate(selection.tasks)}
    batcher = AnswerBatcher(tokenizer)
    tasks = sorted(data)

    def batch_loss() -> torch.Tensor:
        own = [rng.choice(tasks) for _ in range(config.batch_size)]
        grants = [sum(b for t, b in task_bit.items() if rng.random() < config.grant_prob)
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
        return loss

    fit(model, batch_loss, config.steps, config.lr, "train-locks", progress)
    return save_model(model, tokenizer, out_dir,
                      {"lock_selection.json": json.dumps(selection.to_json())})


def fit(model, batch_loss: Callable[[], torch.Tensor], steps: int, lr: float, name: str,
        progress: Callable[[str], None], every: int = 100) -> None:
    """AdamW with a one-cycle schedule and gradient clipping; progress every ``every`` steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.05)
    model.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        loss = batch_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % every == 0 or step == steps:
            progress(f"  {name} step {step}/{steps} loss {loss.item():.3f} "
                     f"({time.perf_counter() - start:.0f} s)")
    model.eval()


def save_model(model, tokenizer, out_dir: str | os.PathLike[str],
               extra_files: dict[str, str]) -> Path:
    """Write an HF model directory atomically (nothing half-written on failure)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in extra_files.items():
            (tmp / name).write_text(text)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
