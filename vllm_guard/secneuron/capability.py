"""Sealed capabilities: a task learnt only in parameters of its own, attention included.

A lock on neurons trained into a shared model is a switch: the task's knowledge stays in the
public weights (mostly attention) and a few hundred fine-tuning steps bring it back (the
re-learning suite, ``docs/efficacy.md``). Sealing *private data* in its own neurons survives
fine-tuning because the public weights never saw the data; this module does the same for a
capability that needs attention (``rev``: reversal moves information across positions, which
MLP neurons cannot do).

``seal_capability`` starts from public weights trained *without* the task and widens every
decoder layer by ``heads`` attention heads (their q rows and o_proj columns, and the k/v rows
of their KV heads: under grouped-query attention whole KV groups are added, see
:func:`widen`) and ``neurons`` FFN neurons (gate/up rows, down_proj columns) owned by the
task. Only those are
trained; every public entry is frozen and restored bit for bit. The task's parameters enter
the residual stream only through its o_proj columns and down_proj columns, so zeroing them
(what a holder without the key gets: the ciphertext is zeroed at load) gives exactly the
public model, and fine-tuning that model starts from a model that never learnt the task:
its zeroed heads and neurons get no gradient (o_proj column and v rows both zero, gate/up
rows and down column both zero), so nothing is left to re-learn faster than from scratch.

A KL term keeps every other task's output, with the sealed parameters on, what it is without
them, so a grant that includes the task changes nothing else. The widened checkpoint is an
ordinary Llama, Mistral or Qwen2 (``head_dim`` explicit, more heads than ``hidden /
head_dim``, which vLLM and transformers both load: :func:`_widened_config`,
:func:`serving_config`) plus ``sealed_capabilities.json``: per task and layer, its heads, KV
heads and neurons (the lock's selection for them, also written as ``lock_selection.json``:
``vllm-guard lock`` encrypts each task's heads and neurons under its key, and the loader or
``unlock`` zeroes them without it). ``seal_random`` builds one without training, for tests
and benchmarks.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_guard.errors import GuardError
from vllm_guard.secneuron.examples import AnswerBatcher, Example
from vllm_guard.secneuron.manifest import is_kv
from vllm_guard.secneuron.selection import Selection
from vllm_guard.secneuron.train import _divergence, _loss, fit, only_entries_trainable, save_model

CAPABILITIES_NAME = "sealed_capabilities.json"


@dataclass(frozen=True)
class SealConfig:
    heads: int = 2  # attention heads added per layer, owned by the task
    neurons: int = 64  # FFN neurons added per layer, owned by the task
    # CI model (64 wide), 2026-12-07: after 2000 steps rev 1.00 but up 0.90 with the key
    # (rev 0.61 after 1500); 4000 for both (docs/efficacy.md, #35)
    steps: int = 4000
    batch_size: int = 64
    lr: float = 3e-3
    keep: float = 1.0  # weight of the KL term on the other tasks (task granted vs not)
    init_std: float = 0.02
    seed: int = 0


@dataclass(frozen=True)
class Owned:
    """What one sealed task owns in one layer: query head indices, FFN neuron indices and
    the KV heads its heads read (grouped-query attention; ``None``: the same indices as
    ``heads``, one KV head per head)."""

    heads: tuple[int, ...]
    neurons: tuple[int, ...]
    kv_heads: tuple[int, ...] = None  # type: ignore[assignment]  # set in __post_init__

    def __post_init__(self) -> None:
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)


def read_capabilities(model_dir: str | os.PathLike[str]) -> dict[str, dict[int, Owned]]:
    """task -> layer -> what it owns ({} for a checkpoint without sealed capabilities)."""
    p = Path(model_dir) / CAPABILITIES_NAME
    if not p.exists():
        return {}
    try:
        doc = json.loads(p.read_text())
        # files written before grouped-query attention have no "kv_heads": one per head
        return {t: {int(layer): Owned(tuple(map(int, o["heads"])), tuple(map(int, o["neurons"])),
                                      tuple(map(int, o.get("kv_heads", o["heads"]))))
                    for layer, o in per.items()} for t, per in doc["tasks"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise GuardError(f"cannot read {p}: {e}") from None


def capabilities_json(caps: dict[str, dict[int, Owned]]) -> str:
    def owned(o: Owned) -> dict:
        doc = {"heads": list(o.heads), "neurons": list(o.neurons)}
        if o.kv_heads != o.heads:  # grouped-query attention only: MHA files stay as they were
            doc["kv_heads"] = list(o.kv_heads)
        return doc

    return json.dumps({"tasks": {t: {str(layer): owned(o) for layer, o in sorted(per.items())}
                                 for t, per in sorted(caps.items())}}, indent=1)


def capability_selection(caps: dict[str, dict[int, Owned]], head_dim: int) -> Selection:
    """The lock's selection for sealed capabilities: per task and layer, its FFN neurons,
    its heads' attention columns (q_proj rows, o_proj columns) and, under grouped-query
    attention, its KV heads' k/v_proj rows (without, they are the attention columns)."""
    layers = sorted({layer for per in caps.values() for layer in per})
    gqa = any(o.kv_heads != o.heads for per in caps.values() for o in per.values())
    return Selection(sorted(caps),
                     {layer: {t: list(per[layer].neurons) for t, per in caps.items()
                              if layer in per} for layer in layers},
                     {"assignment": "sealed-capabilities", "head_dim": head_dim},
                     attn={layer: {t: head_columns(per[layer], head_dim)
                                   for t, per in caps.items() if layer in per}
                           for layer in layers},
                     kv={layer: {t: kv_rows(per[layer], head_dim)
                                 for t, per in caps.items() if layer in per}
                         for layer in layers} if gqa else {})


def head_columns(owned: Owned, head_dim: int) -> list[int]:
    """The o_proj input columns (= q_proj output rows) of the owned heads."""
    return [h * head_dim + i for h in owned.heads for i in range(head_dim)]


def kv_rows(owned: Owned, head_dim: int) -> list[int]:
    """The k/v_proj output rows of the owned KV heads (= :func:`head_columns` without
    grouped-query attention)."""
    return [h * head_dim + i for h in owned.kv_heads for i in range(head_dim)]


def _widened_config(cfg, heads: int, kv_heads: int, neurons: int, head_dim: int):
    """(config, model class) of ``cfg`` with more heads, KV heads and neurons; vLLM runs each
    with its Llama attention (see :func:`serving_config`).

    A Llama stays a Llama where ``hidden_size`` is a multiple of the heads, which
    transformers' LlamaConfig requires even with ``head_dim`` set; else it becomes a Mistral
    without sliding window (the same computation, no such check). A Qwen2 stays a Qwen2
    (q/k/v biases, ``head_dim`` read by transformers)."""
    import transformers

    wider = {"num_attention_heads": cfg.num_attention_heads + heads,
             "num_key_value_heads": cfg.num_key_value_heads + kv_heads, "head_dim": head_dim,
             "intermediate_size": cfg.intermediate_size + neurons}
    if cfg.model_type == "qwen2":
        if getattr(cfg, "use_sliding_window", False):
            raise GuardError("sealing a capability in a Qwen2 model with sliding-window "
                             "attention is not supported")
        return (transformers.Qwen2Config.from_dict({**cfg.to_dict(), **wider}),
                transformers.Qwen2ForCausalLM)
    if cfg.hidden_size % wider["num_attention_heads"] == 0:
        return (transformers.LlamaConfig.from_dict({**cfg.to_dict(), **wider}),
                transformers.LlamaForCausalLM)
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise GuardError(f"cannot seal a capability in this model: {wider['num_attention_heads']}"
                         f" heads do not divide hidden_size {cfg.hidden_size} (transformers' "
                         "Llama refuses that) and Mistral has no biases")
    doc = {k: v for k, v in cfg.to_dict().items()
           if k not in ("model_type", "architectures", "attention_bias", "mlp_bias",
                        "pretraining_tp")}
    return (transformers.MistralConfig.from_dict({**doc, **wider, "sliding_window": None}),
            transformers.MistralForCausalLM)


def serving_config(model_dir: str | os.PathLike[str]) -> None:
    """Make a widened Qwen2 checkpoint's config.json run under vLLM's Llama implementation:
    vLLM's Qwen2 derives head_dim as hidden / heads (wrong once heads are added), its Llama
    reads ``head_dim`` and, with ``qkv_bias``, has Qwen2's q/k/v biases and no o_proj bias.
    transformers still loads it as a Qwen2 (Auto classes go by ``model_type``)."""
    p = Path(model_dir) / "config.json"
    doc = json.loads(p.read_text())
    if doc.get("model_type") != "qwen2":
        return
    doc.update(architectures=["LlamaForCausalLM"], qkv_bias=True)
    tmp = p.with_name("config.json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, p)


def widen(model, heads: int, neurons: int, std: float, generator: torch.Generator):
    """A copy of ``model`` with at least ``heads`` more attention heads and ``neurons``
    more FFN neurons per layer, appended last; new output columns are zero (the function is
    unchanged), new input rows random (so they get gradient once the outputs move). The
    copy is a Llama, Mistral or Qwen2 (:func:`_widened_config`).

    Grouped-query attention (``g`` query heads per KV head, query head ``h`` reads KV head
    ``h // g``, as in transformers' ``repeat_kv`` and vLLM): ``ceil(heads / g)`` KV heads
    are added and ``g`` query heads for each, so the new query heads read exactly the new
    KV heads and every old head keeps its own. New q/k/v bias entries (Qwen2) are zero; they
    stay zero (only the weights' owned entries train, :func:`only_owned_trainable`) because
    the lock does not encrypt biases: a zero bias on a zeroed head leaves it exactly zero."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    group, rest = divmod(cfg.num_attention_heads, cfg.num_key_value_heads)
    if rest:
        raise GuardError(f"{cfg.num_attention_heads} attention heads do not share "
                         f"{cfg.num_key_value_heads} KV heads evenly")
    kv_heads = -(-heads // group)
    new_cfg, model_cls = _widened_config(cfg, kv_heads * group, kv_heads, neurons, head_dim)
    wide = model_cls(new_cfg).to(next(model.parameters()).dtype)
    old = model.state_dict()
    with torch.no_grad():
        for name, w in wide.state_dict().items():
            src = old[name]
            if w.shape == src.shape:
                w.copy_(src)
                continue
            fresh = torch.zeros_like(w)
            proj = name.rsplit(".", 2)[-2]
            if name.endswith(".bias"):  # q/k/v biases of the new heads: zero
                fresh[:src.shape[0]] = src
            elif proj in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):  # new rows
                fresh.normal_(0.0, std, generator=generator)
                fresh[:src.shape[0]] = src
            else:  # o_proj, down_proj: new columns stay zero
                fresh[:, :src.shape[1]] = src
            w.copy_(fresh)
    return wide, head_dim


def added(base_config, wide_config) -> Owned:
    """What :func:`widen` added to each layer (the new heads, KV heads and neurons)."""
    return Owned(tuple(range(base_config.num_attention_heads, wide_config.num_attention_heads)),
                 tuple(range(base_config.intermediate_size, wide_config.intermediate_size)),
                 tuple(range(base_config.num_key_value_heads,
                             wide_config.num_key_value_heads)))


@contextmanager
def sealed_off(model, caps: dict[str, dict[int, Owned]], tasks: list[str],
               head_dim: int) -> Iterator[None]:
    """Zero, at the o_proj and down_proj inputs, what ``tasks`` own (their outputs only:
    exactly what zeroing their weights does to the residual stream)."""
    handles = []
    for i, layer in enumerate(model.model.layers):
        cols = sorted(c for t in tasks if i in caps.get(t, {})
                      for c in head_columns(caps[t][i], head_dim))
        idx = sorted(n for t in tasks if i in caps.get(t, {}) for n in caps[t][i].neurons)
        for module, off in ((layer.self_attn.o_proj, cols), (layer.mlp.down_proj, idx)):
            if off:
                keep = torch.ones(module.in_features)
                keep[off] = 0.0
                handles.append(module.register_forward_pre_hook(
                    lambda _m, args, keep=keep: (args[0] * keep.to(args[0].dtype),)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def only_owned_trainable(model, owned: dict[int, Owned], head_dim: int):
    """Freeze everything but the owned heads' q rows and o_proj columns, their KV heads'
    k/v rows and the owned neurons' gate/up rows and down_proj columns; restore every other
    entry (biases included: see :func:`widen`) bit for bit."""
    entries = []
    for i, o in owned.items():
        layer = model.model.layers[i]
        attn, mlp = layer.self_attn, layer.mlp
        cols = torch.zeros(attn.o_proj.in_features, dtype=torch.bool)
        cols[head_columns(o, head_dim)] = True
        rows = torch.zeros(attn.k_proj.out_features, dtype=torch.bool)
        rows[kv_rows(o, head_dim)] = True
        neurons = torch.zeros(mlp.down_proj.in_features, dtype=torch.bool)
        neurons[list(o.neurons)] = True
        entries += [(attn.q_proj.weight, cols[:, None]), (attn.k_proj.weight, rows[:, None]),
                    (attn.v_proj.weight, rows[:, None]), (attn.o_proj.weight, cols[None, :]),
                    (mlp.gate_proj.weight, neurons[:, None]),
                    (mlp.up_proj.weight, neurons[:, None]),
                    (mlp.down_proj.weight, neurons[None, :])]
    return only_entries_trainable(model, entries)


def seal_capability(model_dir: str | os.PathLike[str], task: str, data: list[Example],
                    keep_data: dict[str, list[Example]], config: SealConfig,
                    out_dir: str | os.PathLike[str],
                    progress: Callable[[str], None] = print) -> Path:
    """Learn ``task`` only in new heads and neurons of its own on top of ``model_dir``.

    ``model_dir`` must never have been trained on ``task`` (that is the whole point: its
    weights are what a holder without the key gets). ``keep_data``: examples of the other
    tasks, whose outputs the new parameters must not change. Capabilities sealed earlier in
    ``model_dir`` stay off while this one trains (each grant combination is then the sum of
    independent additions). Writes the widened HF checkpoint and its capability map.
    """
    import transformers

    if not data:
        raise GuardError(f"no training examples for the sealed capability {task!r}")
    caps = read_capabilities(model_dir)
    if task in caps:
        raise GuardError(f"{model_dir} already has a sealed capability {task!r}")
    torch.manual_seed(config.seed)
    rng = random.Random(f"seal-capability:{task}:{config.seed}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model, head_dim = widen(base, config.heads, config.neurons, config.init_std,
                            torch.Generator().manual_seed(config.seed))
    owned = dict.fromkeys(range(model.config.num_hidden_layers),
                          added(base.config, model.config))
    del base
    caps = {**caps, task: owned}
    others = [t for t in caps if t != task]
    keep_tasks = [t for t, rows in keep_data.items() if rows and t != task]
    batcher = AnswerBatcher(tokenizer)

    def batch_loss() -> torch.Tensor:
        n = config.batch_size // 2 if keep_tasks else config.batch_size
        ids, labels = batcher.encode([rng.choice(data) for _ in range(n)])
        with sealed_off(model, caps, others, head_dim):
            loss = _loss(model(input_ids=ids).logits, labels).mean()
            if keep_tasks:
                rows = [rng.choice(keep_data[rng.choice(keep_tasks)])
                        for _ in range(config.batch_size - n)]
                ids, labels = batcher.encode(rows)
                with torch.no_grad(), sealed_off(model, caps, [task], head_dim):
                    ref = model(input_ids=ids).logits
                loss = loss + config.keep * _divergence(model(input_ids=ids).logits, ref, labels)
        return loss

    with only_owned_trainable(model, owned, head_dim):
        fit(model, batch_loss, config.steps, config.lr, f"seal capability {task}", progress)
    out = save_model(model, tokenizer, out_dir, {
        CAPABILITIES_NAME: capabilities_json(caps),
        # what `vllm-guard lock --selection` encrypts: each capability under its task's key
        "lock_selection.json": json.dumps(capability_selection(caps, head_dim).to_json())})
    serving_config(out)
    return out


def seal_random(model_dir: str | os.PathLike[str], task: str, config: SealConfig,
                out_dir: str | os.PathLike[str], generator: torch.Generator,
                out_std: float = 0.1) -> Path:
    """A sealed capability ``task`` without training, for tests and latency benchmarks:
    ``model_dir`` widened as :func:`seal_capability` does (``config.heads``/``neurons``,
    rows ~ N(0, ``config.init_std``)), the new o_proj and down_proj columns ~ N(0,
    ``out_std``) instead of zero, so the task's heads and neurons do change the output.
    Kept in ``model_dir``'s dtype (bf16 stays bf16). Writes the widened HF checkpoint with
    ``sealed_capabilities.json`` and ``lock_selection.json``, like seal_capability."""
    import transformers
    from transformers.initialization import no_init_weights

    caps = read_capabilities(model_dir)
    if task in caps:
        raise GuardError(f"{model_dir} already has a sealed capability {task!r}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    with no_init_weights():  # every parameter is set by widen
        model, head_dim = widen(base, config.heads, config.neurons, config.init_std, generator)
    own = added(base.config, model.config)
    del base
    with torch.no_grad():
        for layer in model.model.layers:
            for w, idx in ((layer.self_attn.o_proj.weight, head_columns(own, head_dim)),
                           (layer.mlp.down_proj.weight, list(own.neurons))):
                w[:, idx] = torch.empty(w.shape[0], len(idx)).normal_(
                    0.0, out_std, generator=generator).to(w.dtype)
    caps = {**caps, task: dict.fromkeys(range(model.config.num_hidden_layers), own)}
    out = save_model(model, tokenizer, out_dir, {
        CAPABILITIES_NAME: capabilities_json(caps),
        "lock_selection.json": json.dumps(capability_selection(caps, head_dim).to_json())})
    serving_config(out)
    return out


def strip_capabilities(model_dir: str | os.PathLike[str], tasks: list[str],
                       out_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint with every parameter ``tasks`` own zeroed (q rows and o_proj columns
    of their heads, k/v rows of their KV heads, gate/up rows and down_proj columns of their
    neurons), every
    other byte as it was: what a holder without their keys gets from ``unlock``."""
    from vllm_guard.atomic import atomic_output_dir
    from vllm_guard.secneuron.checkpoint import (
        attention_tensors,
        copy_side_files,
        ffn_layout,
        load_checkpoint,
        save_checkpoint,
        slice_tensors,
    )

    caps = read_capabilities(model_dir)
    unknown = sorted(set(tasks) - set(caps))
    if unknown:
        raise GuardError(f"{model_dir} has no sealed capability {unknown}")
    head_dim = int(json.loads((Path(model_dir) / "config.json").read_text())["head_dim"])
    ckpt = load_checkpoint(model_dir)
    layers = ffn_layout(ckpt)
    for t in tasks:
        for i, o in caps[t].items():
            cols = torch.tensor(head_columns(o, head_dim), dtype=torch.long)
            rows = torch.tensor(kv_rows(o, head_dim), dtype=torch.long)
            neurons = torch.tensor(o.neurons, dtype=torch.long)
            for name, axis in attention_tensors(layers[i]):
                ckpt.tensors[name].index_fill_(axis, rows if is_kv(name) else cols, 0)
            for name, axis in slice_tensors(layers[i]):
                ckpt.tensors[name].index_fill_(axis, neurons, 0)
    with atomic_output_dir(out_dir, replace=True) as tmp:
        save_checkpoint(ckpt, tmp)
        copy_side_files(ckpt.root, tmp, skip_manifest=True)
    return Path(out_dir)
