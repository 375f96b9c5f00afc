"""Opening a locked checkpoint with task keys: unwrap the data keys the keys open, decrypt
those groups' slices in place (tags checked) and zero every slice they do not open. Each
group's neurons are one block of a layer (format 6): decrypted and zeroed where they lie,
no gather, no scatter.

Shared by the loader (:mod:`vllm_guard.secneuron.weights`, one layer at a time), offline
unlock (:mod:`vllm_guard.secneuron.unlock`) and revocation (:mod:`vllm_guard.secneuron.rekey`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from vllm_guard.errors import ManifestError
from vllm_guard.secneuron.checkpoint import block_bytes, dtype_name
from vllm_guard.secneuron.crypto import decrypt_chunks_in_place
from vllm_guard.secneuron.manifest import Group, Manifest, Slice, index_digest
from vllm_guard.secneuron.threads import loader_pool


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


def check_slice(t: torch.Tensor, sl: Slice, group: str) -> None:
    """The tensor must have the dtype and shape the manifest's slice was encrypted from."""
    if list(t.shape) != sl.shape or dtype_name(t) != sl.dtype:
        raise ManifestError(
            f"tensor {sl.tensor} is {dtype_name(t)}{list(t.shape)} but the manifest (group "
            f"{group}) says {sl.dtype}{sl.shape}: manifest and weights do not belong together")


def _decrypt_tensor(t: torch.Tensor, axis: int, parts: list[tuple[Group, Slice, bytes]],
                    ckpt_id: str) -> int:
    """Decrypt every opened group's block of one tensor where it lies."""
    done = 0
    for group, sl, data_key in parts:
        block = block_bytes(t, axis, *group.block(sl.layer))
        binding = sl.binding(ckpt_id, group.id, index_digest(group.neurons[sl.layer]))
        decrypt_chunks_in_place(data_key, block, sl.chunks, binding,
                                f"tensor {sl.tensor}, group {group.id}")
        done += block.size
    return done


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
    zero: dict[str, list[tuple[int, int]]] = {}
    for group in manifest.groups:
        for sl in group.slices:
            if layers is not None and sl.layer not in layers:
                continue
            if sl.tensor not in tensors:
                raise ManifestError(f"manifest names tensor {sl.tensor} (group {group.id}), "
                                    "which the checkpoint does not have")
            check_slice(tensors[sl.tensor], sl, group.id)
            axes[sl.tensor] = sl.axis
            if group.id in data_keys:
                opened.setdefault(sl.tensor, []).append((group, sl, data_keys[group.id]))
            elif zero_locked:
                zero.setdefault(sl.tensor, []).append(group.block(sl.layer))
    workers = workers or min(len(opened), os.cpu_count() or 1) or 1

    def decrypt(item: tuple[str, list]) -> int:
        return _decrypt_tensor(tensors[item[0]], axes[item[0]], item[1], manifest.checkpoint_id)

    if workers == 1:  # the loader opens layers on its own pool threads: no pool per layer
        done = [decrypt(item) for item in opened.items()]
    else:
        with loader_pool(workers) as pool:
            done = list(pool.map(decrypt, opened.items()))
    for name, blocks in zero.items():
        for first, count in blocks:
            tensors[name].narrow(axes[name], first, count).zero_()

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
