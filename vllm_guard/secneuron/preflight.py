"""Everything checked before any weight is read, for ``--load-format secneuron``: the
manifest (signature, version, exactly the signed files, side files' SHA-256) and
that each task key opens its groups.

No torch or vLLM: the loader (:mod:`vllm_guard.loader`) runs these checks inside the engine,
and ``vllm-guard serve`` runs the same ones in its parent process before it execs vLLM, so a
typo or a wrong key is one line on stderr in a second, not four tracebacks after 45 s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag

from vllm_guard.errors import DecryptionError, KeyFileError, ManifestError
from vllm_guard.secneuron.crypto import unwrap_data_key
from vllm_guard.secneuron.files import (
    check_file_set,
    check_sizes,
    check_version,
    copy_verified,
    side_files,
    verify_files,
    weight_files,
)
from vllm_guard.secneuron.keys import TaskKey, load_public_key, load_task_keys
from vllm_guard.secneuron.manifest import Manifest, read_manifest, wrap_binding
from vllm_guard.secneuron.options import SecNeuronLoadConfig


def open_checkpoint(root: Path, config: SecNeuronLoadConfig,
                    stage_to: Path | None = None) -> Manifest:
    """Everything checked before any weight is read: signature, ``min_version``, the exact
    set of signed files, and the hash of every non-weight file (config, tokenizer, chat
    template, generation config). Weight shards are checked while they stream.

    With ``stage_to``, the side files are copied there as they are hashed (each read once):
    ``vllm-guard serve`` points vLLM at that copy, so vLLM reads only the bytes checked here.
    """
    manifest = read_manifest(root)
    if manifest is None:
        raise ManifestError(f"{root} has no guard_manifest.json: not a locked checkpoint "
                            "(use the default load format for plaintext models)")
    publisher = load_public_key(config.publisher_key) if config.publisher_key else None
    manifest.verify(publisher, config.allow_unsigned)
    check_version(manifest, config.min_version)
    check_file_set(root, manifest)
    if stage_to is None:
        verify_files(root, manifest, side_files(manifest), config.workers)
    else:
        copy_verified(root, manifest, side_files(manifest), stage_to)
    if not config.verify_weights:
        check_sizes(root, manifest, weight_files(manifest))
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


@dataclass(frozen=True)
class OpenedCheckpoint:
    """A checkpoint that passed every check that reads no weight, and the keys that open it."""

    manifest: Manifest
    keys: dict[str, TaskKey] = field(repr=False)
    data_keys: dict[str, bytes] = field(repr=False)  # group id -> data key


def open_for_serving(root: Path, config: SecNeuronLoadConfig,
                     stage_to: Path | None = None) -> OpenedCheckpoint:
    """:func:`open_checkpoint`, then the task keys loaded and their data keys unwrapped."""
    manifest = open_checkpoint(root, config, stage_to)
    keys = load_task_keys(list(config.keys))
    return OpenedCheckpoint(manifest, keys, open_data_keys(manifest, keys))
