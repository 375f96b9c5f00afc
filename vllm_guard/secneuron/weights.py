"""Reading a locked checkpoint for serving: checks first (:mod:`.preflight`), then decrypted
weights as a stream.

checkpoint -> verify manifest signature and version (``min_version``) -> exactly the signed
files present, config/tokenizer/template files hash-checked -> unwrap data keys of the groups
our task keys open -> per weight shard: read into private memory, 16 MiB blocks hashed in
parallel, each tensor checked against its blocks' signed SHA-256 before use
(``verify_weights``) -> decrypt (parallel, every tag checked) -> zero
every slice we could not open -> ciphertext detector over all FFN neurons and sealed heads ->
(name, tensor).

No vLLM here: the loader adapter (``vllm_guard.loader``) feeds the stream to vLLM's model,
as vLLM keeps tensorizer's iterator out of its loader.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from vllm_guard.errors import EncryptedWeightsError, ManifestError
from vllm_guard.secneuron.checkpoint import (
    attention_tensors,
    private_buffer,
    safetensors_files,
    slice_tensors,
)
from vllm_guard.secneuron.detector import scan_block, scan_layer
from vllm_guard.secneuron.direct import Shard, open_shard, read_in_place
from vllm_guard.secneuron.files import weight_files
from vllm_guard.secneuron.manifest import Manifest, is_attention
from vllm_guard.secneuron.open import OpenReport, decrypt_in_place
from vllm_guard.secneuron.options import SecNeuronLoadConfig
from vllm_guard.secneuron.threads import loader_pool
from vllm_guard.secneuron.verify import iter_verified_tensors


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
    for g in manifest.groups:  # sealed heads: their q/k/v rows and o_proj columns
        for sl in g.slices:
            if sl.layer == layer and is_attention(sl.tensor):
                bad = scan_block(tensors[sl.tensor], sl.axis, g.indices(sl), config.detector)
                if bad:
                    raise EncryptedWeightsError(
                        f"{bad} sealed head vectors of {sl.tensor} still look encrypted "
                        "after decryption; refusing to compute with them")
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


def layer_tensors(manifest: Manifest) -> dict[int, list[str]]:
    """Per layer, the tensors opened together before any reaches the model: gate/up/down,
    and the attention projections where a sealed capability owns heads."""
    sealed = {sl.layer: sl.tensor for g in manifest.groups for sl in g.slices
              if is_attention(sl.tensor)}
    return {layer: [n for n, _ in slice_tensors(info)]
            + ([n for n, _ in attention_tensors(info)] if layer in sealed else [])
            for layer, info in manifest.layers.items()}


def open_shards(root: Path, manifest: Manifest) -> list[Shard]:
    """Every signed weight file, open, its header read once (see :mod:`.direct`)."""
    shards: list[Shard] = []
    try:
        for name in weight_files(manifest):
            shards.append(open_shard(root, name, manifest.files[name]))
    except BaseException:
        for s in shards:
            s.close()
        raise
    return shards


def load_in_place(shards: list[Shard], manifest: Manifest, data_keys: dict[str, bytes],
                  config: SecNeuronLoadConfig, stats: OpenReport,
                  dest: dict[str, torch.Tensor]) -> None:
    """One copy: every tensor read from its file straight into ``dest`` (the model's own
    memory), each block hashed there (``verify_weights``); then each FFN layer (with a
    sealed capability's attention projections) decrypted and zeroed where it lies and
    passed by the detector, on pool threads. Raises before returning if any block, tag or
    verdict fails: the caller must not serve then."""
    per_layer = layer_tensors(manifest)
    missing = sorted({n for names in per_layer.values() for n in names} - set(dest))
    if missing:
        raise ManifestError(f"checkpoint has no tensor {missing[0]} named in the manifest")
    stats.bytes_verified += read_in_place(shards, manifest.files, dest, config.workers,
                                          config.verify_weights)
    workers = config.workers or min(os.cpu_count() or 1, 8)
    with loader_pool(workers) as pool:
        layers = [pool.submit(_open_layer, layer, {n: dest[n] for n in per_layer[layer]},
                              manifest, data_keys, config)
                  for layer in sorted(manifest.layers)]
        for f in layers:
            _, rep = f.result()
            stats.bytes_decrypted += rep.bytes_decrypted
            stats.seconds += rep.seconds


def _missing_ffn(manifest: Manifest, seen: set[str]) -> ManifestError:
    name = next(n for info in manifest.layers.values() for n, _ in slice_tensors(info)
                if n not in seen)
    return ManifestError(f"checkpoint has no tensor {name} named in the manifest")


def _stream_verified(root: Path, manifest: Manifest, data_keys: dict[str, bytes],
                     config: SecNeuronLoadConfig,
                     stats: OpenReport) -> Iterator[tuple[str, torch.Tensor]]:
    """Each shard is read into private memory block by block; pool threads hash the blocks
    in parallel, and each tensor is yielded once the blocks it lies in match their signed
    BLAKE3 (vLLM copies it while the next blocks are hashed). FFN tensors are decrypted in
    that private buffer (no copy-on-write, no scratch copy) as soon as a layer's three
    tensors have arrived (a layer may span two shards)."""
    layer_of = {name: layer for layer, names in layer_tensors(manifest).items()
                for name in names}
    expected = {layer: len(names) for layer, names in layer_tensors(manifest).items()}
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
                if len(pending[layer]) == expected[layer]:
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
    per_layer = layer_tensors(manifest)
    ffn = {name for names in per_layer.values() for name in names}
    for name, f in where.items():
        if name not in ffn:
            yield name, f.get_tensor(name)
    opener = _LayerOpener(manifest, data_keys, config, stats)
    try:
        for layer in sorted(manifest.layers):
            tensors = {}
            for name in per_layer[layer]:
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
