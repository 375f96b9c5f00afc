"""In-process references for served outputs: HF transformers with chosen FFN neurons and
sealed heads' columns zeroed (what a lock or a grant set should compute)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm_guard.secneuron.manifest import Group


def locked_neurons(locked: Path, granted: list[str]) -> dict[int, list[int]]:
    """Per layer, the plaintext model's neurons no granted task opens (the signed manifest's
    ``selected``: its ``neurons`` are positions in the permuted, locked model)."""
    return _not_granted(locked, granted, lambda g: g.selected)


def locked_heads(locked: Path, granted: list[str]) -> dict[int, list[int]]:
    """Per layer, the o_proj input columns of sealed heads no granted task opens (heads are
    not permuted by the lock: the same columns in the plaintext model)."""
    return _not_granted(locked, granted, lambda g: g.attn)


def _not_granted(locked: Path, granted: list[str],
                 blocks: Callable[[Group], dict[int, list[int]]]) -> dict[int, list[int]]:
    from vllm_guard.secneuron.manifest import read_manifest

    out: dict[int, list[int]] = {}
    for g in read_manifest(locked).groups:
        if not set(g.policy) & set(granted):
            for layer, idx in blocks(g).items():
                out.setdefault(layer, []).extend(idx)
    return out


def _load_zeroed(model_dir: Path, zeroed: dict[int, list[int]],
                 heads: dict[int, list[int]] | None):
    """HF model of ``model_dir`` (fp32) with ``zeroed`` FFN neurons (down_proj input) and
    ``heads`` columns (o_proj input) zeroed by forward pre-hooks."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for table, proj in ((zeroed, "down_proj"), (heads or {}, "o_proj")):
        for layer, idx in table.items():
            index = torch.tensor(idx, dtype=torch.long)

            def hook(_m, args, index=index):
                x = args[0].clone()
                x[..., index] = 0
                return (x,)

            layers = model.model.layers[layer]
            module = layers.mlp.down_proj if proj == "down_proj" else layers.self_attn.o_proj
            module.register_forward_pre_hook(hook)
    return model


def hf_reference(model_dir: Path, zeroed: dict[int, list[int]], prompts: list[str],
                 max_new_tokens: int = 8, heads: dict[int, list[int]] | None = None
                 ) -> list[str]:
    """Greedy outputs of HF transformers with the given FFN neurons (and sealed heads'
    columns) zeroed."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = _load_zeroed(model_dir, zeroed, heads)
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            outs.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return outs


def hf_logprobs(model_dir: Path, zeroed: dict[int, list[int]], heads: dict[int, list[int]],
                sequences: list[list[int]]) -> list[list[float]]:
    """Per sequence of token ids, the log-probability of each token after the first given
    the ones before it (teacher forcing), with neurons and heads' columns zeroed."""
    import torch

    model = _load_zeroed(model_dir, zeroed, heads)
    out = []
    with torch.no_grad():
        for ids in sequences:
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
            lp = torch.log_softmax(logits, dim=-1)
            out.append(lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist())
    return out
