"""Re-keying a locked checkpoint in place: rotate a task key (re-wrap its data keys) or revoke
it (fresh data keys, groups re-encrypted, weights rewritten). Both re-sign the manifest
(version + 1) and never re-sign an edit: the current signature and file hashes are checked
first."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import save_file

from vllm_guard.atomic import atomic_replace_dir
from vllm_guard.errors import DecryptionError, KeyFileError, SignatureError
from vllm_guard.secneuron.checkpoint import Checkpoint, block_bytes
from vllm_guard.secneuron.crypto import (
    DEFAULT_CHUNK_BYTES,
    check_chunks_cover,
    decrypt_chunks_in_place,
    encrypt_in_place,
    new_data_key,
    unwrap_data_key,
    wrap_data_key,
)
from vllm_guard.secneuron.files import check_digest, check_file_set, checkpoint_files, digest_files
from vllm_guard.secneuron.keys import TaskKey
from vllm_guard.secneuron.manifest import (
    Group,
    Manifest,
    Slice,
    index_digest,
    read_locked_manifest,
    wrap_binding,
    write_manifest,
)
from vllm_guard.secneuron.open import check_slice
from vllm_guard.secneuron.preflight import check_keys, open_data_keys
from vllm_guard.secneuron.verify import load_verified_checkpoint


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
    manifest = read_locked_manifest(model_dir)
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
    manifest = read_locked_manifest(model_dir)
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
            check_slice(t, sl, g.id)
        for g, sl in parts:
            flat = block_bytes(t, sl.axis, *g.block(sl.layer))  # where it lies
            what = f"tensor {sl.tensor}, group {g.id}"
            check_chunks_cover(flat, sl.chunks, what)
            binding = sl.binding(manifest.checkpoint_id, g.id, index_digest(g.neurons[sl.layer]))
            if g.id in old_keys:
                decrypt_chunks_in_place(old_keys[g.id], flat, sl.chunks, binding, what)
            chunk_bytes = max((c.length for c in sl.chunks), default=DEFAULT_CHUNK_BYTES)
            sl.chunks = encrypt_in_place(new_keys[g.id], flat, binding, chunk_bytes)
    return set(by_tensor)


def _rewrite_in_place(model_dir: str | os.PathLike[str], ckpt: Checkpoint, manifest: Manifest,
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
