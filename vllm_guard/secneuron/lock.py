"""Locking: policy tree + in-place encryption of a plaintext checkpoint.

Data path: selection -> policy tree -> per layer, a permutation of the FFN neurons that makes
each group one block of consecutive positions (:func:`plan_blocks`; the model computes the
same function) -> per-group data key -> chunked AES-256-GCM of each group's gate/up rows and
down columns, where they lie -> files written -> SHA-256 and block BLAKE3 of every file +
wrapped data keys + the permutation -> manifest (signed, version 1).
"""

from __future__ import annotations

import os
import secrets

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tqdm import tqdm

from vllm_guard.atomic import atomic_output_dir
from vllm_guard.errors import KeyFileError, ManifestError
from vllm_guard.secneuron.checkpoint import (
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
    plan_blocks,
    read_manifest,
    wrap_binding,
    write_manifest,
)
from vllm_guard.secneuron.selection import Selection, policy_tree


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

    ckpt_id = secrets.token_hex(16)
    groups = policy_tree(selection)
    manifest = Manifest(ckpt_id, {t: i for i, t in enumerate(selection.tasks)}, layers, groups,
                        key_ids={t: keys[t].key_id for t in selection.tasks})
    data_keys = {g.id: new_data_key() for g in groups}
    for group in groups:
        manifest.wraps[group.id] = {
            t: wrap_data_key(keys[t].key, data_keys[group.id],
                             wrap_binding(ckpt_id, group.id, t, keys[t].key_id))
            for t in group.policy
        }
    for layer in tqdm(sorted(layers), desc="encrypting layers", disable=not progress):
        members = [g for g in groups if layer in g.neurons]
        if not members:
            continue
        # each group's neurons become one block: decrypted where they lie, no gather
        starts = plan_blocks(layers[layer].intermediate_size,
                             [g.neurons[layer] for g in members])
        for g, start in zip(members, starts, strict=True):
            g.selected[layer] = g.neurons[layer]
            g.neurons[layer] = list(range(start, start + len(g.selected[layer])))
        perm = manifest.permutation(layer)
        for name, axis in slice_tensors(layers[layer]):
            t = ckpt.tensors[name]
            permute_neurons(t, axis, perm)
            for g in members:
                sl = Slice(name, ckpt.files[name], layer, axis, dtype_name(t), list(t.shape), [])
                binding = sl.binding(ckpt_id, g.id, index_digest(g.neurons[layer]))
                sl.chunks = encrypt_in_place(data_keys[g.id], block_bytes(t, axis, *g.block(layer)),
                                             binding, chunk_bytes)
                g.slices.append(sl)
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
