"""Task-specific FFN neuron extraction (SecNeuron §extraction).

For each task's calibration set, importance ``I(t, n) = mean |a_n|`` of the ``down_proj``
input over the answer tokens (all tokens when there is no answer). Specificity
``S(t, n) = I(t, n) - lambda * max_{t' != t} I(t', n)``; the top ``fraction`` of neurons by S
in each layer belong to task t.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from tqdm import tqdm

from vllm_guard.errors import GuardError
from vllm_guard.secneuron.examples import encode_example, read_calibration
from vllm_guard.secneuron.selection import Selection, policy_tree


@dataclass(frozen=True)
class ExtractConfig:
    fraction: float = 0.05
    lam: float = 0.8
    max_examples: int = 256
    max_tokens: int = 512


@torch.no_grad()
def task_importance(model, tokenizer, rows: list[dict[str, str]], config: ExtractConfig,
                    desc: str) -> torch.Tensor:
    """[layers, I] mean |down_proj input| over the scored tokens of ``rows``."""
    mlps = [layer.mlp for layer in model.model.layers]
    sums = torch.zeros(len(mlps), mlps[0].down_proj.in_features, dtype=torch.float64)
    count = 0
    span = slice(0, 0)

    def hook(i: int):
        def fn(_module, args):
            a = args[0][0, span].abs().double()
            sums[i] += a.sum(0)
        return fn

    handles = [m.down_proj.register_forward_pre_hook(hook(i)) for i, m in enumerate(mlps)]
    try:
        for row in tqdm(rows[:config.max_examples], desc=desc, unit="ex"):
            p_ids, a_ids = encode_example(tokenizer, row)
            ids = (p_ids + a_ids)[:config.max_tokens]
            start = len(p_ids) if a_ids and len(p_ids) < len(ids) else 0
            span = slice(start, len(ids))
            model(torch.tensor([ids]))
            count += len(ids) - start
    finally:
        for h in handles:
            h.remove()
    return sums / max(count, 1)


def select_neurons(importance: dict[str, torch.Tensor], config: ExtractConfig) -> Selection:
    tasks = list(importance)
    stacked = torch.stack([importance[t] for t in tasks])  # [T, L, I]
    n_layers, size = stacked.shape[1], stacked.shape[2]
    k = max(1, round(config.fraction * size))
    neurons: dict[int, dict[str, list[int]]] = {}
    for ti, task in enumerate(tasks):
        others = torch.cat([stacked[:ti], stacked[ti + 1:]])
        rival = others.max(0).values if len(others) else torch.zeros_like(stacked[ti])
        score = stacked[ti] - config.lam * rival
        top = score.topk(k, dim=-1).indices
        for layer in range(n_layers):
            neurons.setdefault(layer, {})[task] = sorted(top[layer].tolist())
    return Selection(tasks, neurons, {"fraction": config.fraction, "lambda": config.lam})


def summarize(selection: Selection, intermediate_size: int) -> dict:
    groups = policy_tree(selection)
    specific = sum(len(v) for g in groups if len(g.policy) == 1 for v in g.neurons.values())
    shared = sum(len(v) for g in groups if len(g.policy) > 1 for v in g.neurons.values())
    total = intermediate_size * len(selection.neurons)
    return {"layers": len(selection.neurons), "neurons": total, "task_specific": specific,
            "shared": shared, "public": total - specific - shared,
            "groups": {g.id: {"policy": g.policy,
                              "neurons": sum(len(v) for v in g.neurons.values())}
                       for g in groups}}


def extract(model_dir: str | os.PathLike[str], calibration: dict[str, str | os.PathLike[str]],
            config: ExtractConfig) -> Selection:
    """Load the HF model in fp32 on CPU and select each task's neurons."""
    import transformers

    if not 0 < config.fraction < 1:
        raise GuardError(f"--fraction must be in (0, 1), got {config.fraction}")
    data = {task: read_calibration(path) for task, path in calibration.items()}
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    importance = {task: task_importance(model, tokenizer, rows, config, f"importance[{task}]")
                  for task, rows in data.items()}
    selection = select_neurons(importance, config)
    selection.info["summary"] = summarize(selection, model.config.intermediate_size)
    return selection
