"""In-process references for served outputs: HF transformers greedy decoding of a plain
checkpoint with chosen FFN neurons zeroed (what a lock or a grant set should compute)."""

from __future__ import annotations

from pathlib import Path


def locked_neurons(locked: Path, granted: list[str]) -> dict[int, list[int]]:
    """Per layer, the plaintext model's neurons no granted task opens (the signed manifest's
    ``selected``: its ``neurons`` are positions in the permuted, locked model)."""
    from vllm_guard.secneuron.manifest import read_manifest

    out: dict[int, list[int]] = {}
    for g in read_manifest(locked).groups:
        if not set(g.policy) & set(granted):
            for layer, idx in g.selected.items():
                out.setdefault(layer, []).extend(idx)
    return out


def hf_reference(model_dir: Path, zeroed: dict[int, list[int]], prompts: list[str],
                 max_new_tokens: int = 8) -> list[str]:
    """Greedy outputs of HF transformers with the given FFN neurons zeroed at down_proj input."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for layer, idx in zeroed.items():
        index = torch.tensor(idx, dtype=torch.long)

        def hook(_m, args, index=index):
            x = args[0].clone()
            x[..., index] = 0
            return (x,)

        model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(hook)
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            outs.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return outs
