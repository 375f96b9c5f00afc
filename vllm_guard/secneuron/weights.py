"""Reading a locked checkpoint for serving: checks first, then decrypted weights as a stream.

checkpoint -> verify manifest signature and version (``min_version``) -> exactly the signed
files present, config/tokenizer/template files hash-checked -> unwrap data keys of the groups
our task keys open -> per weight shard: read into private memory, 16 MiB blocks hashed in
parallel, each tensor checked against its blocks' signed SHA-256 before use
(``verify_weights``) -> decrypt (parallel, every tag checked) -> zero
every slice we could not open -> ciphertext detector over all FFN neurons -> (name, tensor).

No vLLM here: the loader adapter (``vllm_guard.loader``) feeds the stream to vLLM's model,
as vLLM keeps tensorizer's iterator out of its loader.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from vllm_guard import envs
from vllm_guard.config import from_dict
from vllm_guard.errors import EncryptedWeightsError, ManifestError
from vllm_guard.secneuron.checkpoint import private_buffer, safetensors_files, slice_tensors
from vllm_guard.secneuron.detector import DetectorConfig, scan_layer
from vllm_guard.secneuron.keys import load_public_key
from vllm_guard.secneuron.manifest import Manifest, read_manifest
from vllm_guard.secneuron.open import OpenReport, decrypt_in_place
from vllm_guard.secneuron.threads import loader_pool
from vllm_guard.secneuron.verify import (
    check_file_set,
    check_sizes,
    check_version,
    iter_verified_tensors,
    side_files,
    verify_files,
    weight_files,
)


@dataclass(frozen=True)
class LoaderExtraConfig:
    """``--model-loader-extra-config`` as JSON; strict (unknown keys, wrong types refused)."""

    keys: str | tuple[str, ...] = ()  # key files or directories; one path or a list
    key_dir: str | None = None
    publisher_key: str | None = None
    allow_unsigned: bool = False  # a real JSON boolean: the string "false" is refused
    workers: int | None = None
    verify_weights: bool = True  # hash every weight byte against the signed manifest
    min_version: int = 0  # refuse a signed checkpoint older than this (rollback)

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"'workers' must be at least 1, not {self.workers}")
        paths = [self.keys] if isinstance(self.keys, str) else list(self.keys)
        if "" in paths or self.key_dir == "" or self.publisher_key == "":
            raise ValueError("'keys', 'key_dir' and 'publisher_key' must not be empty strings")


@dataclass(frozen=True)
class SecNeuronLoadConfig:
    """Our part of ``--model-loader-extra-config``."""

    keys: tuple[str, ...] = ()
    publisher_key: str | None = None
    allow_unsigned: bool = False
    workers: int | None = None
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    verify_weights: bool = True
    min_version: int = 0

    WHERE = "secneuron loader option (--model-loader-extra-config)"

    @classmethod
    def from_extra(cls, extra: dict, env: dict[str, str] | None = None) -> SecNeuronLoadConfig:
        """Strict; a bad option is a one-line ``ConfigError`` (a GuardError) naming the key.
        Without ``keys``/``key_dir`` the keys come from ``$VLLM_GUARD_KEYS``, without
        ``publisher_key`` from ``$VLLM_GUARD_PUBLISHER_KEY``."""
        env = os.environ if env is None else env
        x = from_dict(LoaderExtraConfig, extra, cls.WHERE)
        keys = [x.keys] if isinstance(x.keys, str) else list(x.keys)
        if x.key_dir:
            keys.append(x.key_dir)
        if not keys and env.get(envs.KEYS):
            keys = [p for p in env[envs.KEYS].split(os.pathsep) if p]
        return cls(tuple(keys), x.publisher_key or env.get(envs.PUBLISHER_KEY) or None,
                   x.allow_unsigned, x.workers, verify_weights=x.verify_weights,
                   min_version=x.min_version)


def open_checkpoint(root: Path, config: SecNeuronLoadConfig) -> Manifest:
    """Everything checked before any weight is read: signature, ``min_version``, the exact
    set of signed files, and the hash of every non-weight file (config, tokenizer, chat
    template, generation config; vLLM's API server has read some of them already, so a
    mismatch still refuses to start). Weight shards are checked while they stream."""
    manifest = read_manifest(root)
    if manifest is None:
        raise ManifestError(f"{root} has no guard_manifest.json: not a locked checkpoint "
                            "(use the default load format for plaintext models)")
    publisher = load_public_key(config.publisher_key) if config.publisher_key else None
    manifest.verify(publisher, config.allow_unsigned)
    check_version(manifest, config.min_version)
    check_file_set(root, manifest)
    verify_files(root, manifest, side_files(manifest), config.workers)
    if not config.verify_weights:
        check_sizes(root, manifest, weight_files(manifest))
    return manifest


def stream_weights(root: Path, manifest: Manifest, data_keys: dict[str, bytes],
                   config: SecNeuronLoadConfig, stats: OpenReport,
                   stack: ExitStack) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs for ``model.load_weights``: plaintext public weights, FFN layers
    decrypted/zeroed and passed by the detector. A bad hash, tag or verdict raises."""
    if config.verify_weights:
        return _stream_verified(root, manifest, data_keys, config, stats)
    return _stream_mmap(root, manifest, data_keys, config, stats, stack)


def _open_layer(layer: int, tensors: dict[str, torch.Tensor], manifest: Manifest,
                data_keys: dict[str, bytes], config: SecNeuronLoadConfig
                ) -> tuple[dict[str, torch.Tensor], OpenReport]:
    """Decrypt/zero one layer's gate/up/down in place and refuse if any neuron still looks
    encrypted. No layer reaches the model before the detector has passed it."""
    info = manifest.layers[layer]
    rep = decrypt_in_place(tensors, manifest, data_keys, 1, layers={layer})
    verdict = scan_layer(layer, tensors[info.gate], tensors[info.up], tensors[info.down],
                         config.detector)
    if verdict.encrypted.any():
        raise EncryptedWeightsError(
            f"{int(verdict.encrypted.sum())} neurons of layer {layer} still look "
            "encrypted after decryption; refusing to compute with them")
    return tensors, rep


class _LayerOpener:
    """Opens FFN layers (decrypt + detector) on pool threads while the stream goes on, so
    vLLM copies the other tensors meanwhile; layers come out in submission order, each only
    after its detector passed. At most ``2 * workers`` layers are in flight."""

    def __init__(self, manifest: Manifest, data_keys: dict[str, bytes],
                 config: SecNeuronLoadConfig, stats: OpenReport):
        self.manifest, self.data_keys, self.config, self.stats = (manifest, data_keys, config,
                                                                  stats)
        workers = config.workers or min(os.cpu_count() or 1, 8)
        self.pool = loader_pool(workers)
        self.limit = 2 * workers
        self.pending: deque[Future] = deque()

    def submit(self, layer: int, tensors: dict[str, torch.Tensor]
               ) -> Iterator[tuple[str, torch.Tensor]]:
        """Queue a layer; yields layers that must come out first to stay within the limit."""
        while len(self.pending) >= self.limit:
            yield from self._take()
        self.pending.append(self.pool.submit(_open_layer, layer, tensors, self.manifest,
                                             self.data_keys, self.config))

    def ready(self) -> Iterator[tuple[str, torch.Tensor]]:
        while self.pending and self.pending[0].done():
            yield from self._take()

    def drain(self) -> Iterator[tuple[str, torch.Tensor]]:
        while self.pending:
            yield from self._take()

    def _take(self) -> Iterator[tuple[str, torch.Tensor]]:
        tensors, rep = self.pending.popleft().result()
        self.stats.bytes_decrypted += rep.bytes_decrypted
        self.stats.seconds += rep.seconds
        yield from tensors.items()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _missing_ffn(manifest: Manifest, seen: set[str]) -> ManifestError:
    name = next(n for info in manifest.layers.values() for n, _ in slice_tensors(info)
                if n not in seen)
    return ManifestError(f"checkpoint has no tensor {name} named in the manifest")


def _stream_verified(root: Path, manifest: Manifest, data_keys: dict[str, bytes],
                     config: SecNeuronLoadConfig,
                     stats: OpenReport) -> Iterator[tuple[str, torch.Tensor]]:
    """Each shard is read into private memory block by block; pool threads hash the blocks
    in parallel, and each tensor is yielded once the blocks it lies in match their signed
    SHA-256 (vLLM copies it while the next blocks are hashed). FFN tensors are decrypted in
    that private buffer (no copy-on-write, no scratch copy) as soon as a layer's three
    tensors have arrived (a layer may span two shards)."""
    layer_of = {name: layer for layer, info in manifest.layers.items()
                for name, _ in slice_tensors(info)}
    pending: dict[int, dict[str, torch.Tensor]] = {}
    seen: set[str] = set()
    files = weight_files(manifest)
    opener = _LayerOpener(manifest, data_keys, config, stats)
    try:
        for _file, name, t in iter_verified_tensors(root, manifest.files, files,
                                                    config.workers):
            seen.add(name)
            layer = layer_of.get(name)
            if layer is None:
                yield name, t
            else:
                pending.setdefault(layer, {})[name] = t
                if len(pending[layer]) == 3:
                    yield from opener.submit(layer, pending.pop(layer))
            yield from opener.ready()
        yield from opener.drain()
    finally:
        opener.close()
    stats.bytes_verified += sum(manifest.files[f].size for f in files)
    if pending or not set(layer_of) <= seen:
        raise _missing_ffn(manifest, seen)


def _stream_mmap(root: Path, manifest: Manifest, data_keys: dict[str, bytes],
                 config: SecNeuronLoadConfig, stats: OpenReport,
                 stack: ExitStack) -> Iterator[tuple[str, torch.Tensor]]:
    """``verify_weights`` off: weights as vLLM's own loader reads them (mmap-backed), except
    FFN tensors: copied into private memory, decrypted/zeroed and scanned on pool threads
    (a few layers in flight), then yielded."""
    handles = {p.name: stack.enter_context(safe_open(p, framework="pt"))
               for p in safetensors_files(root)}
    where = {name: f for f in handles.values() for name in f.keys()}  # noqa: SIM118
    ffn = {name for info in manifest.layers.values() for name, _ in slice_tensors(info)}
    for name, f in where.items():
        if name not in ffn:
            yield name, f.get_tensor(name)
    opener = _LayerOpener(manifest, data_keys, config, stats)
    try:
        for layer, info in sorted(manifest.layers.items()):
            tensors = {}
            for name in (info.gate, info.up, info.down):
                if name not in where:
                    raise _missing_ffn(manifest, set(where))
                src = where[name].get_tensor(name)
                dst = torch.from_numpy(private_buffer(src.numel() * src.element_size()))
                tensors[name] = dst.view(src.dtype).reshape(src.shape).copy_(src)
            yield from opener.submit(layer, tensors)
            yield from opener.ready()
        yield from opener.drain()
    finally:
        opener.close()
