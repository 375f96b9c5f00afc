"""Collapse trap for lock-aware training (after CTRAP, arXiv 2505.16559; our own recipe).

Someone holding a locked checkpoint without task t's key can fine-tune the public weights on
a few examples of t. The trap shapes training so that such an update destroys the model:

1. attack simulation: from the current weights, with t locked (the attacker holds every other
   key), take ``inner_steps`` Adam-like steps (``inner_lr`` times the gradient's sign) that
   lower t's loss; on a ``lora_share`` of trap steps the steps go through fresh rank-
   ``lora_rank`` adapters on the projections instead (LoRA's update, ``B @ A``, is low rank,
   and a trap taught only full-weight updates let LoRA attacks through);
2. trap: on the updated weights, the *open* tasks must collapse to EOS (CTRAP's collapse), and
   with ``locked_weight`` t itself must still answer EOS (tamper resistance, as in TAR,
   arXiv 2408.00761);
3. benign simulation: the same number of steps on open-task data, after which the open
   tasks must still be answered (so ordinary fine-tuning stays useful).

It is first order: the simulated updates are constants, so the gradient of (2) and (3) with
respect to the weights is their gradient at the updated point, as in first-order MAML. One
trap step costs about ``2 * inner_steps + 2`` forward/backward passes; ``every`` spaces them,
and the last ``settle`` share of training runs without them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import functional_call

from vllm_guard.errors import GuardError
from vllm_guard.secneuron.examples import AnswerBatcher, Example

# The projections LoRA adapts (attention and MLP of a Llama-style model), and PEFT's usual alpha.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_ALPHA = 16.0


@dataclass(frozen=True)
class TrapConfig:
    # Defaults measured on the CI suite: weight 1 / benign 1 / 2 inner steps collapsed the open
    # tasks after an lr 1e-3 attack but made them *more* robust to one at lr 3e-4.
    weight: float = 3.0  # weight of the open tasks' collapse after the attack
    locked_weight: float = 0.0  # weight of the attacked task staying at EOS after it
    benign_weight: float = 0.5  # weight of the stay-useful-after-benign-tuning term
    inner_steps: int = 3
    inner_lr: float = 3e-3  # per simulated step, per weight (sign steps, like Adam's)
    batch_size: int = 16
    every: int = 2  # add the trap terms on every n-th training step
    # Share of the last training steps without the trap terms, so the open tasks settle
    # back (with none, `sort` stayed at 0.96-0.97 of 1.00 on the full suite).
    settle: float = 0.2
    # Share of trap steps whose simulated tuning goes through LoRA adapters, and their rank.
    lora_share: float = 0.5
    lora_rank: int = 8

    def __post_init__(self) -> None:
        if self.inner_steps < 1 or self.every < 1 or self.batch_size < 1:
            raise GuardError("trap inner steps, batch size and spacing must be at least 1")
        if self.inner_lr <= 0 or min(self.weight, self.locked_weight, self.benign_weight) < 0:
            raise GuardError("trap step size must be positive and its weights not negative")
        if not 0 <= self.settle < 1:
            raise GuardError("trap settle share must be in [0, 1)")
        if not 0 <= self.lora_share <= 1 or self.lora_rank < 1:
            raise GuardError("trap LoRA share must be in [0, 1] and its rank at least 1")


Params = dict[str, torch.Tensor]
MaskedLoss = Callable[[Params, list[Example], int, bool], torch.Tensor]


def simulate_tuning(params: Params, loss_at: Callable[[Params], torch.Tensor], steps: int,
                    lr: float) -> Params:
    """Weights after ``steps`` sign-gradient steps on ``loss_at``; the shifts are constants."""
    names = [n for n, p in params.items() if p.requires_grad]
    shifted = dict(params)
    for _ in range(steps):
        grads = torch.autograd.grad(loss_at(shifted), [shifted[n] for n in names],
                                    allow_unused=True)
        for n, g in zip(names, grads, strict=True):
            if g is not None:
                shifted[n] = shifted[n] - lr * g.detach().sign()
    return shifted


def simulate_lora_tuning(params: Params, loss_at: Callable[[Params], torch.Tensor], steps: int,
                         lr: float, rank: int, generator: torch.Generator) -> Params:
    """Weights after ``steps`` sign-gradient steps on fresh LoRA adapters (B = 0, A uniform,
    as an attacker starts them) on the projections; the adapters are constants."""
    names = [n for n, p in params.items() if p.requires_grad and n.endswith(".weight")
             and n.removesuffix(".weight").rsplit(".", 1)[-1] in LORA_TARGETS]
    scale = LORA_ALPHA / rank
    a = {n: torch.empty(rank, params[n].shape[1]).uniform_(
        -1 / math.sqrt(params[n].shape[1]), 1 / math.sqrt(params[n].shape[1]),
        generator=generator) for n in names}
    b = {n: torch.zeros(params[n].shape[0], rank) for n in names}
    shifted = dict(params)
    for _ in range(steps):
        grads = torch.autograd.grad(loss_at(shifted), [shifted[n] for n in names],
                                    allow_unused=True)
        for n, g in zip(names, grads, strict=True):
            if g is None:
                continue
            g = g.detach() * scale  # d loss / d(B @ A)
            b[n], a[n] = b[n] - lr * (g @ a[n].T).sign(), a[n] - lr * (b[n].T @ g).sign()
            shifted[n] = params[n] + scale * b[n] @ a[n]
    return shifted


class CollapseTrap:
    """The trap terms for one training step (see the module docstring)."""

    def __init__(self, model, batcher: AnswerBatcher, data: dict[str, list[Example]],
                 open_tasks: list[str], task_bit: dict[str, int], config: TrapConfig,
                 mask: Callable[[torch.Tensor], object], rng: random.Random):
        self.model, self.batcher, self.data = model, batcher, data
        self.open_tasks, self.task_bit, self.config = open_tasks, task_bit, config
        self.mask, self.rng = mask, rng

    def _loss(self, params: Params, rows: list[Example], grant: int,
              collapse: bool) -> torch.Tensor:
        ids, labels = self.batcher.encode(rows)
        if collapse:
            labels = labels.masked_fill(labels != -100, self.batcher.eos)
        with self.mask(torch.full((len(rows),), grant, dtype=torch.int64)):
            logits = functional_call(self.model, params, (ids,)).logits
        logits, labels = logits[:, :-1], labels[:, 1:]
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels,
                                                 ignore_index=-100)

    def _rows(self, tasks: list[str]) -> list[Example]:
        return [self.rng.choice(self.data[self.rng.choice(tasks)])
                for _ in range(self.config.batch_size)]

    def loss(self) -> torch.Tensor:
        """Trap + benign terms: t locked and attacked, the other open tasks judged after."""
        cfg = self.config
        if len(self.open_tasks) < 2:
            return torch.zeros(())
        target = self.rng.choice(self.open_tasks)
        others = [t for t in self.open_tasks if t != target]
        grant = sum(self.task_bit[t] for t in others)  # every key but the target's
        params = dict(self.model.named_parameters())
        if self.rng.random() < cfg.lora_share:  # the attacker (and the benign user) uses LoRA
            seed = self.rng.getrandbits(62)

            def tune(loss_at: Callable[[Params], torch.Tensor]) -> Params:
                return simulate_lora_tuning(params, loss_at, cfg.inner_steps, cfg.inner_lr,
                                            cfg.lora_rank, torch.Generator().manual_seed(seed))
        else:
            def tune(loss_at: Callable[[Params], torch.Tensor]) -> Params:
                return simulate_tuning(params, loss_at, cfg.inner_steps, cfg.inner_lr)
        attack_rows = self._rows([target])
        attacked = tune(lambda p: self._loss(p, attack_rows, grant, False))
        trap = cfg.weight * self._loss(attacked, self._rows(others), grant, True)
        if cfg.locked_weight:
            trap = trap + cfg.locked_weight * self._loss(attacked, self._rows([target]), grant,
                                                         True)
        benign_rows = self._rows(others)
        tuned = tune(lambda p: self._loss(p, benign_rows, grant, False))
        benign = self._loss(tuned, self._rows(others), grant, False)
        return trap + cfg.benign_weight * benign
