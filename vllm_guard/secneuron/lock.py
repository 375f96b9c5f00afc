"""Locking: policy tree + in-place encryption of a plaintext checkpoint.

Data path: selection -> policy tree -> per layer, a permutation of the FFN neurons that makes
each group one block of consecutive positions (:func:`plan_blocks`; the model computes the
same function) -> per-group data key -> chunked AES-256-GCM of each group's gate/up rows and
down columns, and of a sealed capability's q rows and o_proj columns (its heads, already
one block per group: ``secneuron/capability.py``) and k/v rows (its KV heads), where they
lie -> files written -> SHA-256 and block BLAKE3 of every file + wrapped data keys + the
permutation -> manifest (signed, format 6).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tqdm import tqdm

from vllm_guard.atomic import atomic_output_dir
from vllm_guard.errors import KeyFileError, ManifestError
from vllm_guard.secneuron.checkpoint import (
    attention_tensors,
    block_bytes,
    copy_side_files,
    dtype_name,
    ffn_layout,
    load_checkpoint,
    permute_neurons,
    save_checkpoint,
    slice_tensors,
)
from vllm_guard.secneuron.crypto import (
    DEFAULT_CHUNK_BYTES,
    encrypt_in_place,
    new_data_key,
    wrap_data_key,
)
from vllm_guard.secneuron.files import checkpoint_files, digest_files
from vllm_guard.secneuron.keys import TaskKey
from vllm_guard.secneuron.manifest import (
    Manifest,
    Slice,
    index_digest,
    is_kv,
    plan_blocks,
    read_manifest,
    wrap_binding,
    write_manifest,
)
from vllm_guard.secneuron.selection import Selection, policy_tree


def _head_dim(model_dir: Path) -> int:
    """The attention head size from the checkpoint's config (explicit or hidden / heads)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
        raise ManifestError(f"cannot read the head size from {model_dir}/config.json: {e}") \
            from None


def lock_checkpoint(
    model_dir: str | os.PathLike[str],
    selection: Selection,
    keys: dict[str, TaskKey],
    out_dir: str | os.PathLike[str],
    signing_key: Ed25519PrivateKey | None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = True,
) -> Manifest:
    """Encrypt every task group of ``selection`` in place and write a locked model directory."""
    if read_manifest(model_dir) is not None:
        raise ManifestError(f"{model_dir} is already locked (it has a manifest)")
    missing = [t for t in selection.tasks if t not in keys]
    if missing:
        raise KeyFileError(f"no key given for task(s) {missing} named in the selection")
    unknown = sorted(set(keys) - set(selection.tasks))
    if unknown:
        raise KeyFileError(f"key(s) given for task(s) {unknown} not in the selection "
                           f"(tasks: {selection.tasks})")
    if len(selection.tasks) > 62:
        raise ManifestError("at most 62 tasks fit the int64 neuron bit table")

    ckpt = load_checkpoint(model_dir)
    layers = ffn_layout(ckpt)
    for layer, per_task in selection.neurons.items():
        if layer not in layers:
            raise ManifestError(f"selection names layer {layer}, the model has {len(layers)}")
        size = layers[layer].intermediate_size
        for task, idx in per_task.items():
            if idx and (idx[0] < 0 or idx[-1] >= size):
                raise ManifestError(f"selection for task {task!r}, layer {layer} has neuron "
                                    f"indices outside [0, {size})")

    rows: dict[int, tuple[int, int]] = {}  # layer -> (q_proj rows, k_proj rows)
    for layer in sorted(set(selection.attn) | set(selection.kv)):
        if layer not in layers:
            raise ManifestError(f"selection names layer {layer}, the model has {len(layers)}")
        for name, axis in attention_tensors(layers[layer]):
            if name not in ckpt.tensors:
                raise ManifestError(f"selection seals attention columns of layer {layer}, but "
                                    f"the checkpoint has no {name}")
            size = ckpt.tensors[name].shape[axis]
            kv = is_kv(name)
            for task, cols in selection.attn.get(layer, {}).items():
                idx = selection.kv.get(layer, {}).get(task, cols) if kv else cols
                if idx and (idx[0] < 0 or idx[-1] >= size):
                    raise ManifestError(f"selection for task {task!r}, layer {layer} has "
                                        f"attention {'k/v rows' if kv else 'columns'} "
                                        f"outside [0, {size})")
        q, k = (ckpt.tensors[n].shape[0] for n, _ in attention_tensors(layers[layer])[:2])
        rows[layer] = (q, k)
        head_dim = _head_dim(ckpt.root)
        for task, cols in selection.attn.get(layer, {}).items():
            for idx in (cols, selection.kv.get(layer, {}).get(task, cols)):
                if idx and (idx[0] % head_dim or len(idx) % head_dim):
                    raise ManifestError(f"selection for task {task!r}, layer {layer}: sealed "
                                        f"attention rows/columns are not whole heads (head_dim "
                                        f"{head_dim}): a public head would read sealed rows")

    ckpt_id = secrets.token_hex(16)
    groups = policy_tree(selection)
    manifest = Manifest(ckpt_id, {t: i for i, t in enumerate(selection.tasks)}, layers, groups,
                        key_ids={t: keys[t].key_id for t in selection.tasks})
    manifest.check_attention(rows)  # heads adjacent, k/v rows theirs: before any encryption
    _check_biases(ckpt, layers, groups)
    data_keys = {g.id: new_data_key() for g in groups}
    for group in groups:
        manifest.wraps[group.id] = {
            t: wrap_data_key(keys[t].key, data_keys[group.id],
                             wrap_binding(ckpt_id, group.id, t, keys[t].key_id))
            for t in group.policy
        }
    for layer in tqdm(sorted(layers), desc="encrypting layers", disable=not progress):
        members = [g for g in groups if layer in g.neurons]
        if members:
            # each group's neurons become one block: decrypted where they lie, no gather
            starts = plan_blocks(layers[layer].intermediate_size,
                                 [g.neurons[layer] for g in members])
            for g, start in zip(members, starts, strict=True):
                g.selected[layer] = g.neurons[layer]
                g.neurons[layer] = list(range(start, start + len(g.selected[layer])))
            perm = manifest.permutation(layer)
            for name, axis in slice_tensors(layers[layer]):
                permute_neurons(ckpt.tensors[name], axis, perm)
                _encrypt(ckpt, name, axis, layer, members, data_keys, ckpt_id, chunk_bytes)
        # sealed heads: not permuted (checked one block per group above), encrypted in place
        owners = [g for g in groups if g.attn.get(layer)]
        for name, axis in attention_tensors(layers[layer]) if owners else ():
            _encrypt(ckpt, name, axis, layer, owners, data_keys, ckpt_id, chunk_bytes)
    data_keys.clear()
    manifest.check_layout()
    with atomic_output_dir(out_dir) as tmp:
        save_checkpoint(ckpt, tmp)
        copy_side_files(ckpt.root, tmp, skip_manifest=True)
        # Hash what is on disk now: the signature then covers every byte a server reads.
        manifest.files = digest_files(tmp, checkpoint_files(tmp))
        if signing_key is not None:
            manifest.sign(signing_key)
        write_manifest(manifest, tmp)
    return manifest


def _check_biases(ckpt, layers: dict, groups: list) -> None:
    """q/k/v biases (Qwen2) are not encrypted: a sealed head's must be zero (capability.widen
    adds them zero and training keeps them so); a nonzero one would be learnt task state in
    plaintext. Zero, a zeroed head stays exactly zero without the key."""
    for g in groups:
        for layer in g.attn:
            for name, _ in attention_tensors(layers[layer])[:3]:
                bias = ckpt.tensors.get(name.removesuffix("weight") + "bias")
                idx = g.kv_rows(layer) if is_kv(name) else g.attn[layer]
                if bias is not None and idx and bias[idx].any():
                    raise ManifestError(f"selection seals heads of layer {layer} whose "
                                        f"{name.removesuffix('weight')}bias entries are not "
                                        "zero: biases are not encrypted")


def _encrypt(ckpt, name: str, axis: int, layer: int, members: list, data_keys: dict[str, bytes],
             ckpt_id: str, chunk_bytes: int) -> None:
    """Encrypt each member group's block of one tensor where it lies."""
    t = ckpt.tensors[name]
    for g in members:
        sl = Slice(name, ckpt.files[name], layer, axis, dtype_name(t), list(t.shape), [])
        binding = sl.binding(ckpt_id, g.id, index_digest(g.indices(sl)))
        sl.chunks = encrypt_in_place(data_keys[g.id], block_bytes(t, axis, *g.span(sl)),
                                     binding, chunk_bytes)
        g.slices.append(sl)
