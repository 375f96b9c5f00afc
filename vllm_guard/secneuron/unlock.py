"""Unlocking: write a plaintext checkpoint from a locked one and task keys (offline tool), in
the plaintext model's neuron order (the signed permutation undone)."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from vllm_guard.atomic import atomic_output_dir
from vllm_guard.secneuron.checkpoint import permute_neurons, save_checkpoint, slice_tensors
from vllm_guard.secneuron.files import check_file_set, check_version
from vllm_guard.secneuron.keys import TaskKey
from vllm_guard.secneuron.manifest import Manifest, read_locked_manifest
from vllm_guard.secneuron.open import OpenReport, decrypt_in_place
from vllm_guard.secneuron.preflight import open_data_keys
from vllm_guard.secneuron.verify import load_verified_checkpoint, read_side_files


def verify_for_offline_use(manifest: Manifest, publisher: Ed25519PublicKey | None,
                           allow_unsigned: bool) -> str:
    """Offline tools accept an embedded-key signature when no publisher key is given."""
    status = manifest.signature_status(publisher)
    if status == "valid (embedded key)":
        return status
    manifest.verify(publisher, allow_unsigned)
    return status


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
    manifest = read_locked_manifest(model_dir)
    verify_for_offline_use(manifest, publisher, allow_unsigned)
    check_version(manifest, min_version)
    check_file_set(model_dir, manifest)
    data_keys = open_data_keys(manifest, keys)
    side = read_side_files(model_dir, manifest)
    ckpt = load_verified_checkpoint(model_dir, manifest)
    report = decrypt_in_place(ckpt.tensors, manifest, data_keys, tasks=list(keys))
    for layer, info in manifest.layers.items():
        perm = manifest.permutation(layer)
        for name, axis in slice_tensors(info):
            permute_neurons(ckpt.tensors[name], axis, perm, inverse=True)
    with atomic_output_dir(out_dir) as tmp:
        save_checkpoint(ckpt, tmp)
        for name, data in side.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
    return report
