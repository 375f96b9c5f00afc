"""Locking (policy tree + in-place encryption), opening, unlocking, key rotation, revocation.

Data path: selection -> policy tree -> per-group data key -> chunked AES-256-GCM of each
group's gate/up rows and down columns -> files written -> SHA-256 of every file + wrapped
data keys -> manifest (signed, version 1).
The loader uses :func:`open_data_keys` and :func:`decrypt_in_place` from here too.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from safetensors.torch import save_file
from tqdm import tqdm

from vllm_guard.atomic import atomic_output_dir, atomic_replace_dir
from vllm_guard.errors import DecryptionError, KeyFileError, ManifestError, SignatureError
from vllm_guard.secneuron.checkpoint import (
    GroupSlab,
    checkpoint_files,
    copy_side_files,
    ffn_layout,
    load_checkpoint,
    save_checkpoint,
    slice_tensors,
)
from vllm_guard.secneuron.crypto import (
    DEFAULT_CHUNK_BYTES,
    chunk_aad,
    decrypt_chunk_in_place,
    encrypt_in_place,
    new_data_key,
    unwrap_data_key,
    wrap_data_key,
)
from vllm_guard.secneuron.keys import TaskKey
from vllm_guard.secneuron.manifest import (
    Group,
    Manifest,
    Slice,
    read_manifest,
    write_manifest,
)
from vllm_guard.secneuron.threads import loader_pool
from vllm_guard.secneuron.verify import (
    check_digest,
    check_file_set,
    check_version,
    digest_files,
    load_verified_checkpoint,
    read_side_files,
)

ALL_BITS = -1  # int64 with every bit set: public neurons serve every grant


@dataclass
class Selection:
    """Per-layer neuron sets per task, as written by ``extract``."""

    tasks: list[str]
    neurons: dict[int, dict[str, list[int]]]  # layer -> task -> neuron indices
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"tasks": self.tasks, "info": self.info,
                "layers": {str(k): v for k, v in sorted(self.neurons.items())}}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Selection:
        try:
            doc = json.loads(Path(path).read_text())
            return cls(list(doc["tasks"]),
                       {int(k): {t: sorted(int(i) for i in v) for t, v in per.items()}
                        for k, per in doc["layers"].items()},
                       doc.get("info", {}))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ManifestError(f"cannot read neuron selection {path}: {e}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_json()))


def policy_tree(selection: Selection) -> list[Group]:
    """Group neurons by the exact set of tasks that selected them; each set is an OR policy."""
    by_policy: dict[tuple[str, ...], dict[int, list[int]]] = {}
    for layer, per_task in sorted(selection.neurons.items()):
        owners: dict[int, list[str]] = {}
        for task in selection.tasks:
            for n in per_task.get(task, []):
                owners.setdefault(n, []).append(task)
        for n, tasks in sorted(owners.items()):
            by_policy.setdefault(tuple(sorted(tasks)), {}).setdefault(layer, []).append(n)
    ordered = sorted(by_policy.items(), key=lambda kv: (len(kv[0]), kv[0]))
    return [Group(f"g{i}", list(policy), neurons) for i, (policy, neurons) in enumerate(ordered)]


def index_digest(indices: list[int]) -> str:
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:32]


def wrap_binding(checkpoint_id: str, group: str, task: str, key_id: str) -> dict:
    return {"ckpt": checkpoint_id, "group": group, "task": task, "key_id": key_id}


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


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
        for name, axis in slice_tensors(layers[layer]):
            t = ckpt.tensors[name]
            slab = GroupSlab(t, axis, [g.neurons[layer] for g in members])  # one gather
            for i, g in enumerate(members):
                sl = Slice(name, ckpt.files[name], layer, axis, _dtype_name(t), list(t.shape), [])
                binding = sl.binding(ckpt_id, g.id, index_digest(g.neurons[layer]))
                sl.chunks = encrypt_in_place(data_keys[g.id], slab.bytes_of(i), binding,
                                             chunk_bytes)
                g.slices.append(sl)
            slab.write_back()
    data_keys.clear()
    with atomic_output_dir(out_dir) as tmp:
        save_checkpoint(ckpt, tmp)
        copy_side_files(ckpt.root, tmp, skip_manifest=True)
        # Hash what is on disk now: the signature then covers every byte a server reads.
        manifest.files = digest_files(tmp, checkpoint_files(tmp))
        if signing_key is not None:
            manifest.sign(signing_key)
        write_manifest(manifest, tmp)
    return manifest


def check_keys(manifest: Manifest, keys: dict[str, TaskKey]) -> None:
    """Every key must be for a task of this checkpoint, with the key id the manifest expects."""
    for task, key in keys.items():
        if task not in manifest.tasks:
            raise KeyFileError(f"key for unknown task {task!r}: checkpoint "
                               f"{manifest.checkpoint_id[:8]} has tasks {sorted(manifest.tasks)}")
        gone = manifest.revoked.get(key.key_id)
        if gone is not None:
            raise KeyFileError(f"key for task {task!r} (key id {key.key_id}) was revoked at "
                               f"checkpoint version {gone['version']}")
        expected = manifest.key_ids.get(task)
        if expected is None:
            raise KeyFileError(f"task {task!r} has no key in checkpoint "
                               f"{manifest.checkpoint_id[:8]}: its access was revoked")
        if key.key_id != expected:
            raise KeyFileError(
                f"key for task {task!r} has key id {key.key_id}, checkpoint "
                f"{manifest.checkpoint_id[:8]} expects {expected} (wrong key, rotated key, or a "
                "key for a different checkpoint)")


def open_data_keys(manifest: Manifest, keys: dict[str, TaskKey]) -> dict[str, bytes]:
    """Unwrap the data key of every group whose OR policy names a task we hold a key for."""
    check_keys(manifest, keys)
    opened: dict[str, bytes] = {}
    for group in manifest.groups:
        holder = next((t for t in group.policy if t in keys), None)
        if holder is None:
            continue
        wrapped = manifest.wraps.get(group.id, {}).get(holder)
        if wrapped is None:
            raise ManifestError(f"group {group.id} has no wrapped data key for task {holder!r}")
        key = keys[holder]
        try:
            binding = wrap_binding(manifest.checkpoint_id, group.id, holder, key.key_id)
            opened[group.id] = unwrap_data_key(key.key, wrapped, binding)
        except (InvalidTag, ValueError):
            raise DecryptionError(f"task key {holder!r} (key id {key.key_id}) does not open "
                                  f"group {group.id}: wrong key or tampered keyring") from None
    return opened


@dataclass
class OpenReport:
    """What opening a locked checkpoint did."""

    tasks: list[str]
    opened_groups: list[str]
    locked_groups: list[str]
    bytes_decrypted: int
    seconds: float
    per_layer: dict[int, dict[str, int]]  # layer -> {"public", "open", "locked"}
    bytes_verified: int = 0  # weight bytes checked against the signed SHA-256 (loader)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_decrypted / self.seconds / 1e9 if self.seconds else 0.0


def _check_slice(t: torch.Tensor, sl: Slice, group: str) -> None:
    if list(t.shape) != sl.shape or _dtype_name(t) != sl.dtype:
        raise ManifestError(
            f"tensor {sl.tensor} is {_dtype_name(t)}{list(t.shape)} but the manifest (group "
            f"{group}) says {sl.dtype}{sl.shape}: manifest and weights do not belong together")


def _decrypt_tensor(t: torch.Tensor, axis: int, parts: list[tuple[Group, Slice, bytes]],
                    ckpt_id: str) -> int:
    """Gather every opened group's neurons of one tensor at once, decrypt each, scatter back."""
    slab = GroupSlab(t, axis, [g.neurons[sl.layer] for g, sl, _ in parts])
    for i, (group, sl, data_key) in enumerate(parts):
        idx = group.neurons[sl.layer]
        view = memoryview(slab.bytes_of(i)).cast("B")
        if sum(c.length for c in sl.chunks) != len(view):
            raise ManifestError(f"tensor {sl.tensor}, group {group.id}: chunk lengths do not "
                                "cover the slice")
        binding = sl.binding(ckpt_id, group.id, index_digest(idx))
        aead = AESGCM(data_key)
        offset = 0
        for i_chunk, chunk in enumerate(sl.chunks):
            decrypt_chunk_in_place(aead, view[offset:offset + chunk.length], chunk,
                                   chunk_aad(binding, i_chunk, len(sl.chunks)),
                                   f"tensor {sl.tensor}, group {group.id}, chunk {i_chunk}")
            offset += chunk.length
    slab.write_back()
    return slab.nbytes


def decrypt_in_place(
    tensors: dict[str, torch.Tensor],
    manifest: Manifest,
    data_keys: dict[str, bytes],
    workers: int | None = None,
    zero_locked: bool = True,
    tasks: list[str] | tuple = (),
    layers: set[int] | None = None,
) -> OpenReport:
    """Decrypt opened groups and zero every locked slice we could not open, in ``tensors``.

    Fails (DecryptionError) on any bad tag; the caller must then discard ``tensors``.
    ``zero_locked=False`` leaves ciphertext in place (only for testing the detector).
    ``tasks`` (the key holders' tasks) is only reported. ``layers`` limits the work to those
    layers (streaming loaders decrypt one layer at a time).
    """
    start = time.perf_counter()
    opened: dict[str, list[tuple[Group, Slice, bytes]]] = {}  # tensor -> its opened slices
    axes: dict[str, int] = {}
    zero: dict[str, list[int]] = {}
    for group in manifest.groups:
        for sl in group.slices:
            if layers is not None and sl.layer not in layers:
                continue
            if sl.tensor not in tensors:
                raise ManifestError(f"manifest names tensor {sl.tensor} (group {group.id}), "
                                    "which the checkpoint does not have")
            _check_slice(tensors[sl.tensor], sl, group.id)
            axes[sl.tensor] = sl.axis
            if group.id in data_keys:
                opened.setdefault(sl.tensor, []).append((group, sl, data_keys[group.id]))
            elif zero_locked:
                zero.setdefault(sl.tensor, []).extend(group.neurons[sl.layer])
    workers = workers or min(len(opened), os.cpu_count() or 1) or 1

    def decrypt(item: tuple[str, list]) -> int:
        return _decrypt_tensor(tensors[item[0]], axes[item[0]], item[1], manifest.checkpoint_id)

    if workers == 1:  # the loader opens layers on its own pool threads: no pool per layer
        done = [decrypt(item) for item in opened.items()]
    else:
        with loader_pool(workers) as pool:
            done = list(pool.map(decrypt, opened.items()))
    for name, idx in zero.items():
        tensors[name].index_fill_(axes[name], torch.tensor(idx, dtype=torch.long), 0)

    return OpenReport(
        tasks=sorted(tasks),
        opened_groups=[g.id for g in manifest.groups if g.id in data_keys],
        locked_groups=[g.id for g in manifest.groups if g.id not in data_keys],
        bytes_decrypted=sum(done),
        seconds=time.perf_counter() - start,
        per_layer=layer_counts(manifest, data_keys),
    )


def layer_counts(manifest: Manifest, data_keys: dict[str, bytes]) -> dict[int, dict[str, int]]:
    """Per layer: how many neurons are public, opened by our keys, and still locked."""
    per_layer = {layer: {"public": info.intermediate_size, "open": 0, "locked": 0}
                 for layer, info in manifest.layers.items()}
    for group in manifest.groups:
        state = "open" if group.id in data_keys else "locked"
        for layer, idx in group.neurons.items():
            per_layer[layer][state] += len(idx)
            per_layer[layer]["public"] -= len(idx)
    return per_layer


def _bits_table(sizes: dict[int, int], groups: list[Group],
                task_bit: dict[str, int]) -> dict[int, torch.Tensor]:
    bits = {layer: torch.full((size,), ALL_BITS, dtype=torch.int64)
            for layer, size in sizes.items()}
    for group in groups:
        mask = sum(1 << task_bit[t] for t in group.policy)
        for layer, idx in group.neurons.items():
            bits[layer][torch.tensor(idx, dtype=torch.long)] = mask
    return bits


def neuron_bits(manifest: Manifest) -> dict[int, torch.Tensor]:
    """Per layer, int64 per neuron: bit t set if task t may use it; all bits for public ones."""
    return _bits_table({layer: info.intermediate_size for layer, info in manifest.layers.items()},
                       manifest.groups, manifest.tasks)


def selection_bits(selection: Selection, intermediate_size: int) -> dict[int, torch.Tensor]:
    """The :func:`neuron_bits` table that locking ``selection`` will produce (same task bits)."""
    return _bits_table({layer: intermediate_size for layer in selection.neurons},
                       policy_tree(selection), {t: i for i, t in enumerate(selection.tasks)})


def verify_for_offline_use(manifest: Manifest, publisher: Ed25519PublicKey | None,
                           allow_unsigned: bool) -> str:
    """Offline tools accept an embedded-key signature when no publisher key is given."""
    status = manifest.signature_status(publisher)
    if status == "valid (embedded key)":
        return status
    manifest.verify(publisher, allow_unsigned)
    return status


def _read_locked(model_dir: str | os.PathLike[str]) -> Manifest:
    manifest = read_manifest(model_dir)
    if manifest is None:
        raise ManifestError(f"{model_dir} has no guard_manifest.json: not a locked checkpoint")
    return manifest


def unlock_checkpoint(
    model_dir: str | os.PathLike[str],
    keys: dict[str, TaskKey],
    out_dir: str | os.PathLike[str],
    publisher: Ed25519PublicKey | None = None,
    allow_unsigned: bool = False,
    min_version: int = 0,
) -> OpenReport:
    """Write a plaintext checkpoint: opened groups decrypted, all other locked slices zeroed.

    Checks everything first: signature, version, the file set, and the signed SHA-256 of
    every file (weights hashed in the same pass as they are read; side files written out
    from the verified bytes).
    """
    manifest = _read_locked(model_dir)
    verify_for_offline_use(manifest, publisher, allow_unsigned)
    check_version(manifest, min_version)
    check_file_set(model_dir, manifest)
    data_keys = open_data_keys(manifest, keys)
    side = read_side_files(model_dir, manifest)
    ckpt = load_verified_checkpoint(model_dir, manifest)
    report = decrypt_in_place(ckpt.tensors, manifest, data_keys, tasks=list(keys))
    with atomic_output_dir(out_dir) as tmp:
        save_checkpoint(ckpt, tmp)
        for name, data in side.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
    return report


def _check_resignable(manifest: Manifest, signing_key: Ed25519PrivateKey | None,
                      what: str) -> None:
    """Re-signing must never launder an edit: the current signature must verify under the
    same publisher key first. An unsigned manifest stays unsigned."""
    if manifest.signature is None:
        if signing_key is not None:
            raise SignatureError(f"{what}: the manifest is unsigned; lock the checkpoint again "
                                 "to sign it")
        return
    if signing_key is None:
        raise KeyFileError(f"{what} re-signs the manifest (the key ring and version are "
                           "signed): give the publisher's signing key (--signing-key FILE)")
    status = manifest.signature_status(signing_key.public_key())
    if status == "untrusted key":
        raise SignatureError(f"{what}: the manifest is signed by another publisher key than "
                             "--signing-key")
    manifest.verify(signing_key.public_key())


def _resign(manifest: Manifest, signing_key: Ed25519PrivateKey | None) -> None:
    manifest.version += 1
    if signing_key is not None:
        manifest.sign(signing_key)


def rotate_task_key(model_dir: str | os.PathLike[str], old: TaskKey, new: TaskKey,
                    signing_key: Ed25519PrivateKey | None = None) -> int:
    """Re-wrap the task's data keys under ``new`` and re-sign (version + 1).

    For a lost or retired key only: the data keys and ciphertext stay the same, so whoever
    kept the old key and an old manifest can still open the old groups. It does NOT revoke
    (see :func:`revoke_task`). Only the manifest changes (atomic replace).
    """
    manifest = _read_locked(model_dir)
    if new.task != old.task:
        raise KeyFileError(f"new key is for task {new.task!r}, old key for {old.task!r}")
    if new.key_id == old.key_id:
        raise KeyFileError(f"new key for task {new.task!r} has the same key id as the old one")
    _check_resignable(manifest, signing_key, "rotate")
    check_keys(manifest, {old.task: old})
    rewrapped = 0
    for group in manifest.groups:
        if old.task not in group.policy:
            continue
        try:
            data_key = unwrap_data_key(
                old.key, manifest.wraps[group.id][old.task],
                wrap_binding(manifest.checkpoint_id, group.id, old.task, old.key_id))
        except (InvalidTag, KeyError, ValueError):
            raise DecryptionError(f"old key for task {old.task!r} does not open group "
                                  f"{group.id}") from None
        manifest.wraps[group.id][old.task] = wrap_data_key(
            new.key, data_key, wrap_binding(manifest.checkpoint_id, group.id, new.task, new.key_id))
        rewrapped += 1
    manifest.key_ids[old.task] = new.key_id
    _resign(manifest, signing_key)
    write_manifest(manifest, model_dir)
    return rewrapped


@dataclass(frozen=True)
class RevokeReport:
    """What :func:`revoke_task` did."""

    task: str
    version: int
    groups: tuple[str, ...]  # re-encrypted under fresh data keys
    dropped: tuple[str, ...]  # of those, groups nobody can open any more
    files: tuple[str, ...]  # rewritten weight files
    kept: bool  # the task keeps access under its new key


def revoke_task(
    model_dir: str | os.PathLike[str],
    task: str,
    keys: dict[str, TaskKey],
    signing_key: Ed25519PrivateKey,
    new_key: TaskKey | None = None,
) -> RevokeReport:
    """Revoke ``task``'s current key: fresh data keys for every group it opens, those groups
    re-encrypted, the new data keys wrapped for every other task of their policy (and for
    ``new_key`` if given, else the task loses access), manifest re-signed (version + 1).

    ``keys`` must hold the current key of every other task sharing a group with ``task``; it
    may hold ``task``'s current key too, needed only to keep (``new_key``) a group that no
    other task opens. The old key then opens nothing, even with an old key ring spliced in:
    the ciphertext is new. The directory is rebuilt beside the old one and swapped in
    atomically; an interrupted run leaves the old checkpoint as it was.
    """
    manifest = _read_locked(model_dir)
    if task not in manifest.tasks:
        raise KeyFileError(f"unknown task {task!r}: checkpoint has tasks "
                           f"{sorted(manifest.tasks)}")
    if task not in manifest.key_ids:
        raise KeyFileError(f"task {task!r} has no key in this checkpoint (already revoked)")
    if signing_key is None:
        raise KeyFileError("rotate --revoke re-encrypts and re-signs: give the publisher's "
                           "signing key (--signing-key FILE)")
    if manifest.signature is None:
        raise SignatureError("rotate --revoke: the manifest is unsigned; lock the checkpoint "
                             "again to sign it")
    _check_resignable(manifest, signing_key, "rotate --revoke")
    if new_key is not None:
        if new_key.task != task:
            raise KeyFileError(f"--new key is for task {new_key.task!r}, not {task!r}")
        if new_key.key_id == manifest.key_ids[task] or new_key.key_id in manifest.revoked:
            raise KeyFileError(f"--new key for task {task!r} is not new (key id "
                               f"{new_key.key_id} was used before)")
    check_keys(manifest, keys)
    check_file_set(model_dir, manifest)
    affected = [g for g in manifest.groups if task in g.policy]
    holders = {g.id: [t for t in g.policy if t != task and t in manifest.key_ids]
               for g in affected}
    missing = sorted({t for ts in holders.values() for t in ts} - set(keys))
    if missing:
        shared = [g.id for g in affected if set(holders[g.id]) & set(missing)]
        raise KeyFileError(f"revoking {task!r} re-wraps groups {shared} for tasks {missing}: "
                           "give their current keys (--key FILE)")
    old_keys = open_data_keys(manifest, {t: k for t, k in keys.items()
                                         if t in manifest.key_ids})
    if new_key is not None:
        lost = [g.id for g in affected if g.id not in old_keys]
        if lost:
            raise KeyFileError(f"groups {lost} are opened only by {task!r}: give its current "
                               "key (--old FILE) to keep them under --new, or revoke without "
                               "--new to drop them")
    ckpt = load_verified_checkpoint(model_dir, manifest)  # never re-sign tampered bytes
    new_keys = {g.id: new_data_key() for g in affected}
    changed = _reencrypt(ckpt.tensors, manifest, affected, old_keys, new_keys)

    old_id = manifest.key_ids[task]
    for g in affected:
        ring = {t: wrap_data_key(keys[t].key, new_keys[g.id], wrap_binding(
                    manifest.checkpoint_id, g.id, t, keys[t].key_id)) for t in holders[g.id]}
        if new_key is not None:
            ring[task] = wrap_data_key(new_key.key, new_keys[g.id], wrap_binding(
                manifest.checkpoint_id, g.id, task, new_key.key_id))
        manifest.wraps[g.id] = ring
    new_keys.clear()
    if new_key is not None:
        manifest.key_ids[task] = new_key.key_id
    else:
        del manifest.key_ids[task]
    manifest.revoked[old_id] = {"task": task, "version": manifest.version + 1}
    files = sorted({ckpt.files[name] for name in changed})
    _rewrite_in_place(model_dir, ckpt, manifest, files, signing_key)
    return RevokeReport(task, manifest.version, tuple(g.id for g in affected),
                        tuple(g.id for g in affected if not manifest.wraps[g.id]),
                        tuple(files), new_key is not None)


def _reencrypt(tensors: dict[str, torch.Tensor], manifest: Manifest, groups: list[Group],
               old_keys: dict[str, bytes], new_keys: dict[str, bytes]) -> set[str]:
    """Decrypt each group's slices with its old data key (tags checked) and encrypt them
    under the new one, same chunking. A group no key opened (its only holder is being
    dropped) is encrypted as it is: its plaintext is then gone for everyone."""
    by_tensor: dict[str, list[tuple[Group, Slice]]] = {}
    for g in groups:
        for sl in g.slices:
            by_tensor.setdefault(sl.tensor, []).append((g, sl))
    for name, parts in by_tensor.items():
        t = tensors[name]
        for g, sl in parts:
            _check_slice(t, sl, g.id)
        axis = parts[0][1].axis
        slab = GroupSlab(t, axis, [g.neurons[sl.layer] for g, sl in parts])
        for i, (g, sl) in enumerate(parts):
            idx = g.neurons[sl.layer]
            flat = slab.bytes_of(i)
            view = memoryview(flat).cast("B")
            if sum(c.length for c in sl.chunks) != len(view):
                raise ManifestError(f"tensor {sl.tensor}, group {g.id}: chunk lengths do not "
                                    "cover the slice")
            binding = sl.binding(manifest.checkpoint_id, g.id, index_digest(idx))
            if g.id in old_keys:
                aead = AESGCM(old_keys[g.id])
                pos = 0
                for j, chunk in enumerate(sl.chunks):
                    decrypt_chunk_in_place(aead, view[pos:pos + chunk.length], chunk,
                                           chunk_aad(binding, j, len(sl.chunks)),
                                           f"tensor {sl.tensor}, group {g.id}, chunk {j}")
                    pos += chunk.length
            chunk_bytes = max((c.length for c in sl.chunks), default=DEFAULT_CHUNK_BYTES)
            sl.chunks = encrypt_in_place(new_keys[g.id], flat, binding, chunk_bytes)
        slab.write_back()
    return set(by_tensor)


def _rewrite_in_place(model_dir: str | os.PathLike[str], ckpt, manifest: Manifest,
                      rewritten: list[str], signing_key: Ed25519PrivateKey) -> None:
    """New directory beside the old one: rewritten shards saved, every other signed file
    hard-linked (or copied), all hashed, manifest re-signed; then one atomic swap."""
    root = Path(model_dir)
    with atomic_replace_dir(root) as tmp:
        by_file: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in ckpt.tensors.items():
            if ckpt.files[name] in rewritten:
                by_file.setdefault(ckpt.files[name], {})[name] = t
        for fname, tensors in by_file.items():
            save_file(tensors, str(tmp / fname), metadata=ckpt.metadata.get(fname) or None)
        for name in manifest.files:
            if name in rewritten:
                continue
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(root / name, tmp / name)
            except OSError:
                shutil.copy2(root / name, tmp / name)
        fresh = digest_files(tmp, checkpoint_files(tmp))
        for name, d in fresh.items():  # unchanged files must still be the signed ones
            if name not in rewritten:
                check_digest(name, manifest.files[name], d.sha256, d.size)
        manifest.files = fresh
        _resign(manifest, signing_key)
        write_manifest(manifest, tmp)
