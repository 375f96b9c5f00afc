"""``--load-format secneuron``: serve a SecNeuron-locked checkpoint inside vLLM.

checkpoint -> verify manifest signature and version (``min_version``) -> exactly the signed
files present, config/tokenizer/template files hash-checked -> unwrap data keys of the groups
our task keys open -> per weight shard: read + SHA-256 in one pass (shards in parallel),
checked before use (``verify_weights``) -> decrypt (parallel, every tag checked) -> zero
every slice we could not open -> ciphertext detector over all FFN neurons ->
``model.load_weights`` -> ``neuron_bits`` on each MLP act op.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from vllm_guard.config import from_dict
from vllm_guard.errors import EncryptedWeightsError, GuardError, ManifestError
from vllm_guard.grants.engine import STATE as GRANT_STATE
from vllm_guard.kernels.layer import NEURON_BITS_ATTR
from vllm_guard.log import get_logger
from vllm_guard.secneuron.checkpoint import safetensors_files, slice_tensors
from vllm_guard.secneuron.detector import DetectorConfig, scan_layer
from vllm_guard.secneuron.keys import load_public_key, load_task_keys
from vllm_guard.secneuron.lock import (
    OpenReport,
    decrypt_in_place,
    layer_counts,
    neuron_bits,
    open_data_keys,
)
from vllm_guard.secneuron.manifest import Manifest, read_manifest
from vllm_guard.secneuron.verify import (
    check_file_set,
    check_sizes,
    check_version,
    iter_verified_safetensors,
    side_files,
    verify_files,
    weight_files,
)

logger = get_logger(__name__)

KEYS_ENV = "VLLM_GUARD_KEYS"  # os.pathsep-separated key files or directories
PUBLISHER_ENV = "VLLM_GUARD_PUBLISHER_KEY"


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
        if not keys and env.get(KEYS_ENV):
            keys = [p for p in env[KEYS_ENV].split(os.pathsep) if p]
        return cls(tuple(keys), x.publisher_key or env.get(PUBLISHER_ENV) or None,
                   x.allow_unsigned, x.workers, verify_weights=x.verify_weights,
                   min_version=x.min_version)


def tp_shard(bits: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The neuron bits of this tensor-parallel rank (vLLM splits the intermediate dim evenly)."""
    size = bits.shape[0]
    if size % world:
        raise GuardError(f"intermediate size {size} is not divisible by TP size {world}")
    part = size // world
    return bits[rank * part:(rank + 1) * part].clone()


def attach_neuron_bits(model: nn.Module, bits: dict[int, torch.Tensor], rank: int = 0,
                       world: int = 1) -> int:
    """Give each decoder layer's MLP activation op its (TP-sharded) neuron bit table."""
    attached = 0
    for name, module in model.named_modules():
        if not name.endswith("mlp.act_fn"):
            continue
        layer = int(name.split(".layers.")[1].split(".")[0])
        table = tp_shard(bits[layer], rank, world)
        existing = getattr(module, NEURON_BITS_ATTR, None)
        if isinstance(existing, torch.Tensor) and existing.shape == table.shape:
            existing.copy_(table)  # keep the tensor identity a compiled graph may hold
        else:
            setattr(module, NEURON_BITS_ATTR, table)
        attached += 1
    return attached


def _tp() -> tuple[int, int]:
    try:
        from vllm.distributed import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except (ImportError, AssertionError):
        return 0, 1


class SecNeuronModelLoader(BaseModelLoader):
    """Decrypts what the configured task keys open, zeros the rest, then loads normally."""

    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        self.config = SecNeuronLoadConfig.from_extra(
            dict(load_config.model_loader_extra_config or {}))

    def download_model(self, model_config: ModelConfig) -> None:
        self._model_dir(model_config)

    @staticmethod
    def _model_dir(model_config: ModelConfig) -> Path:
        root = Path(model_config.model)
        if not root.is_dir():
            raise ManifestError(f"--load-format secneuron needs a local model directory, "
                                f"got {model_config.model}")
        return root

    def _manifest(self, root: Path) -> Manifest:
        return open_checkpoint(root, self.config)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        start = time.perf_counter()
        try:
            report, manifest = self._load(model, model_config)
        except GuardError as e:
            # One clear line for operators; vLLM prints the traceback after it.
            logger.error("vllm-guard: refusing to load %s: %s", model_config.model, e)
            raise
        GRANT_STATE.task_bits = dict(manifest.tasks)
        rank, world = _tp()
        attached = attach_neuron_bits(model, neuron_bits(manifest), rank, world)
        self._log(report, attached)
        # Same wording as vLLM's DefaultModelLoader, so benchmarks compare like with like.
        logger.info("vllm-guard secneuron: Loading weights took %.2f seconds",
                    time.perf_counter() - start)

    def _load(self, model: nn.Module, model_config: ModelConfig):
        root = self._model_dir(model_config)
        manifest = self._manifest(root)
        keys = load_task_keys(list(self.config.keys))
        data_keys = open_data_keys(manifest, keys)
        if not keys:
            logger.warning("vllm-guard: no task keys given: serving the PUBLIC-ONLY model, every "
                           "locked task (%s) is zeroed", ", ".join(sorted(manifest.tasks)))
        stats = OpenReport(sorted(keys), sorted(data_keys),
                           [g.id for g in manifest.groups if g.id not in data_keys], 0, 0.0,
                           layer_counts(manifest, data_keys))
        with ExitStack() as stack:
            weights = stream_weights(root, manifest, data_keys, self.config, stats, stack)
            loaded = model.load_weights(weights)
        if isinstance(loaded, set):
            missing = {n for n, _ in model.named_parameters()} - loaded
            if missing:
                raise ManifestError(f"checkpoint lacks weights for {sorted(missing)[:5]}")
        return stats, manifest

    @staticmethod
    def _log(report: OpenReport, attached: int) -> None:
        per_layer = json.dumps({str(k): v for k, v in sorted(report.per_layer.items())})
        logger.info("vllm-guard secneuron: checked %.1f MB of weights against the signed "
                    "manifest (SHA-256)%s", report.bytes_verified / 1e6,
                    "" if report.bytes_verified else " (verify_weights off: sizes only)")
        logger.info("vllm-guard secneuron: open tasks %s; groups open %d, locked %d; "
                    "decrypted %.1f MB in %.3f s (%.2f GB/s); neuron tables on %d MLPs",
                    report.tasks or "none (public only)", len(report.opened_groups),
                    len(report.locked_groups), report.bytes_decrypted / 1e6, report.seconds,
                    report.gb_per_s, attached)
        logger.info("vllm-guard secneuron neurons per layer (public/open/locked): %s", per_layer)


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
    check_version(manifest, getattr(config, "min_version", 0))
    check_file_set(root, manifest)
    verify_files(root, manifest, side_files(manifest), config.workers)
    if not getattr(config, "verify_weights", True):
        check_sizes(root, manifest, weight_files(manifest))
    return manifest


def stream_weights(root: Path, manifest: Manifest, data_keys: dict[str, bytes],
                   config: SecNeuronLoadConfig, stats: OpenReport,
                   stack: ExitStack) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs for ``model.load_weights``: plaintext public weights, FFN layers
    decrypted/zeroed and passed by the detector. A bad hash, tag or verdict raises."""
    if getattr(config, "verify_weights", True):
        return _stream_verified(root, manifest, data_keys, config, stats)
    return _stream_mmap(root, manifest, data_keys, config, stats, stack)


def _open_layer(layer: int, tensors: dict[str, torch.Tensor], manifest: Manifest,
                data_keys: dict[str, bytes], config: SecNeuronLoadConfig,
                stats: OpenReport) -> dict[str, torch.Tensor]:
    """Decrypt/zero one layer's gate/up/down in place and refuse if any neuron still looks
    encrypted. No layer reaches the model before the detector has passed it."""
    info = manifest.layers[layer]
    rep = decrypt_in_place(tensors, manifest, data_keys, config.workers, layers={layer})
    stats.bytes_decrypted += rep.bytes_decrypted
    stats.seconds += rep.seconds
    verdict = scan_layer(layer, tensors[info.gate], tensors[info.up], tensors[info.down],
                         config.detector)
    if verdict.encrypted.any():
        raise EncryptedWeightsError(
            f"{int(verdict.encrypted.sum())} neurons of layer {layer} still look "
            "encrypted after decryption; refusing to compute with them")
    return tensors


def _missing_ffn(manifest: Manifest, seen: set[str]) -> ManifestError:
    name = next(n for info in manifest.layers.values() for n, _ in slice_tensors(info)
                if n not in seen)
    return ManifestError(f"checkpoint has no tensor {name} named in the manifest")


def _stream_verified(root: Path, manifest: Manifest, data_keys: dict[str, bytes],
                     config: SecNeuronLoadConfig,
                     stats: OpenReport) -> Iterator[tuple[str, torch.Tensor]]:
    """Each shard is read into private memory and hashed in the same pass (shards in
    parallel), compared with its signed SHA-256, and only then parsed and yielded. FFN
    tensors are decrypted in that private buffer (no copy-on-write, no scratch copy) as soon
    as a layer's three tensors have arrived (a layer may span two shards)."""
    layer_of = {name: layer for layer, info in manifest.layers.items()
                for name, _ in slice_tensors(info)}
    pending: dict[int, dict[str, torch.Tensor]] = {}
    seen: set[str] = set()
    for fname, tensors, _ in iter_verified_safetensors(root, manifest.files,
                                                      weight_files(manifest), config.workers):
        stats.bytes_verified += manifest.files[fname].size
        for name, t in tensors.items():
            seen.add(name)
            layer = layer_of.get(name)
            if layer is None:
                yield name, t
            else:
                pending.setdefault(layer, {})[name] = t
        del tensors
        for layer in sorted(pending):
            if len(pending[layer]) == 3:
                yield from _open_layer(layer, pending.pop(layer), manifest, data_keys, config,
                                       stats).items()
    if pending or not set(layer_of) <= seen:
        raise _missing_ffn(manifest, seen)


def _stream_mmap(root: Path, manifest: Manifest, data_keys: dict[str, bytes],
                 config: SecNeuronLoadConfig, stats: OpenReport,
                 stack: ExitStack) -> Iterator[tuple[str, torch.Tensor]]:
    """``verify_weights`` off: weights as vLLM's own loader reads them (mmap-backed), except
    FFN tensors: copied into three reused scratch buffers, decrypted/zeroed and scanned one
    layer at a time, then yielded (vLLM copies each into its parameter before the next).
    """
    handles = {p.name: stack.enter_context(safe_open(p, framework="pt"))
               for p in safetensors_files(root)}
    where = {name: f for f in handles.values() for name in f.keys()}  # noqa: SIM118
    ffn = {name for info in manifest.layers.values() for name, _ in slice_tensors(info)}
    for name, f in where.items():
        if name not in ffn:
            yield name, f.get_tensor(name)
    scratch: dict[str, torch.Tensor] = {}
    for layer, info in sorted(manifest.layers.items()):
        tensors = {}
        for role, name in (("gate", info.gate), ("up", info.up), ("down", info.down)):
            if name not in where:
                raise _missing_ffn(manifest, set(where))
            src = where[name].get_tensor(name)
            buf = scratch.get(role)
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                buf = scratch[role] = torch.empty_like(src)
            tensors[name] = buf.copy_(src)
        yield from _open_layer(layer, tensors, manifest, data_keys, config, stats).items()


def register_secneuron_loader() -> None:
    from vllm.model_executor.model_loader import register_model_loader

    register_model_loader("secneuron")(SecNeuronModelLoader)

