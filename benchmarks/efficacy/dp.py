"""The privacy playbook's answer: learn the personal records with DP-SGD instead of sealing them.

Starts from the public model (the suite without the records), as the sealed variant does, and
fine-tunes every weight but the norms on the records' examples mixed with open-task examples
(so the open tasks are not forgotten), with Opacus's DP-SGD (Poisson sampling, per-example
clipping, RDP accounting) to a target epsilon over the whole mix. The same recipe without
clipping or noise (epsilon = inf) shows what it learns without privacy.

The guarantee is per example; each record has two examples (phone and ID), so per record it is
at most twice epsilon (group privacy).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_guard.secneuron.examples import AnswerBatcher, Example
from vllm_guard.secneuron.train import save_model


@dataclass(frozen=True)
class DpConfig:
    epochs: int = 40
    public_per_private: int = 3  # open-task examples mixed in per record example
    batch_size: int = 64  # expected (Poisson) batch
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    seed: int = 0


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int]:
        return (i,)  # a tuple: Opacus reads the sample's fields from it


def train_dp(model_dir: Path, private: list[Example], public: list[Example], epsilon: float,
             config: DpConfig, out: Path, progress: Callable[[str], None] = print) -> dict:
    """Fine-tune ``model_dir`` on ``private`` + ``public`` with DP-SGD at ``epsilon`` (inf: no
    DP); save to ``out``. Returns the accountant's epsilon and the noise multiplier used."""
    import transformers
    from opacus import PrivacyEngine

    torch.manual_seed(config.seed)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for name, p in model.named_parameters():
        p.requires_grad_("norm" not in name)  # Opacus has no per-example rule for LlamaRMSNorm
    batcher = AnswerBatcher(tok)
    rows = [*private, *public]
    loader = torch.utils.data.DataLoader(_Indices(len(rows)), batch_size=config.batch_size,
                                         shuffle=True, collate_fn=lambda b: [x[0] for x in b])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                            weight_decay=0.0)
    engine = None
    model.train()
    if math.isfinite(epsilon):
        engine = PrivacyEngine(accountant="rdp")
        model, opt, loader = engine.make_private_with_epsilon(
            module=model, optimizer=opt, data_loader=loader, target_epsilon=epsilon,
            target_delta=config.delta, epochs=config.epochs, max_grad_norm=config.max_grad_norm)
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        for batch in loader:  # Opacus gives an empty batch as [tensor of shape (0,)]
            idx = [int(i) for x in batch for i in torch.as_tensor(x).reshape(-1)]
            if not idx:
                continue  # an empty Poisson batch: nothing to learn from
            ids, labels = batcher.encode([rows[i] for i in idx])
            logits = model(input_ids=ids).logits[:, :-1]
            target = labels[:, 1:]
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target,
                                                   ignore_index=-100, reduction="none")
            loss = (ce.sum(1) / (target != -100).sum(1).clamp(min=1)).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if epoch % 20 == 0 or epoch == config.epochs:
            progress(f"  DP-SGD epsilon {epsilon:g} epoch {epoch}/{config.epochs} loss "
                     f"{loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    spent = engine.get_epsilon(config.delta) if engine else math.inf
    plain = model._module if engine else model
    plain.eval()
    save_model(plain, tok, out, {})
    return {"target_epsilon": epsilon, "epsilon": spent, "delta": config.delta,
            "noise_multiplier": opt.noise_multiplier if engine else 0.0,
            "seconds": round(time.perf_counter() - start, 1)}
