"""``--load-format secneuron``: a thin vLLM adapter over :mod:`vllm_guard.secneuron.weights`.

checkpoint -> (secneuron.weights: checks, decrypted stream) -> ``model.load_weights`` ->
``neuron_bits`` on each MLP act op, ``head_bits`` on each o_proj with open sealed heads
(:mod:`vllm_guard.runtime`) -> masked ops.
"""

from __future__ import annotations

import itertools
import json
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from vllm_guard import envs
from vllm_guard.errors import GuardError, ManifestError
from vllm_guard.loader.placement import capture_placement
from vllm_guard.log import get_logger
from vllm_guard.runtime import GRANT_BUFFER_ATTR, HEAD_BITS_ATTR, NEURON_BITS_ATTR
from vllm_guard.runtime.grant_state import STATE as GRANT_STATE
from vllm_guard.secneuron.files import check_copy, weight_files
from vllm_guard.secneuron.neuron_bits import head_bits, neuron_bits
from vllm_guard.secneuron.open import OpenReport, layer_counts
from vllm_guard.secneuron.options import SecNeuronLoadConfig
from vllm_guard.secneuron.preflight import open_for_serving
from vllm_guard.secneuron.weights import load_in_place, open_shards, stream_weights

logger = get_logger(__name__)
_NOT_PLACED = object()  # the model's loaders do more than a plain copy: stream instead



def tp_shard(bits: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The neuron bits of this tensor-parallel rank (vLLM splits the intermediate dim evenly)."""
    size = bits.shape[0]
    if size % world:
        raise GuardError(f"intermediate size {size} is not divisible by TP size {world}")
    part = size // world
    return bits[rank * part:(rank + 1) * part].clone()


def param_device(model: nn.Module, name: str) -> torch.device:
    """Where the MLP that owns module ``name`` computes (its parameters' device).

    vLLM runs ``load_weights`` outside its ``with target_device:`` block, so anything we
    create here would land on the CPU unless placed explicitly."""
    parent = model.get_submodule(name.rpartition(".")[0])
    for p in itertools.chain(parent.parameters(), model.parameters()):
        return p.device
    return torch.device("cpu")


def _layer_of(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def _attach(model: nn.Module, name: str, module: nn.Module, attr: str, bits: torch.Tensor,
            rank: int, world: int) -> None:
    """Give ``module`` its (TP-sharded) bit table on the device of its layer's parameters,
    and point it at a grant buffer on that device."""
    device = param_device(model, name)
    table = tp_shard(bits, rank, world).to(device)
    existing = getattr(module, attr, None)
    if (isinstance(existing, torch.Tensor) and existing.shape == table.shape
            and existing.device == device):
        existing.copy_(table)  # keep the tensor identity a compiled graph may hold
    else:
        setattr(module, attr, table)
    buffer = getattr(module, GRANT_BUFFER_ATTR, None)
    if isinstance(buffer, torch.Tensor) and buffer.device != device:
        setattr(module, GRANT_BUFFER_ATTR, GRANT_STATE.place_buffer(device))


def attach_neuron_bits(model: nn.Module, bits: dict[int, torch.Tensor], rank: int = 0,
                       world: int = 1) -> int:
    """Give each decoder layer's MLP activation op its neuron bit table."""
    attached = 0
    for name, module in model.named_modules():
        if name.endswith("mlp.act_fn"):
            _attach(model, name, module, NEURON_BITS_ATTR, bits[_layer_of(name)], rank, world)
            attached += 1
    check_placement(model)
    return attached


def attach_head_bits(model: nn.Module, bits: dict[int, torch.Tensor], rank: int = 0,
                     world: int = 1, grants_on: bool = True) -> int:
    """Give the o_proj of each layer in ``bits`` (sealed heads) its column bit table.

    With per-request grants on, every o_proj of a layer this rank holds must be the masked
    one (kernels.layer); one that is not (another attention class, vLLM's Transformers
    backend) would serve opened heads to every request, so the load is refused. Without
    grants nothing is masked per request, for heads as for neurons: the keys decide for all."""
    from vllm.model_executor.models.utils import PPMissingLayer

    held: set[int] = set()
    for name, m in model.named_modules():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] == "layers" and parts[-1].isdigit() \
                and not isinstance(m, PPMissingLayer):
            held.add(int(parts[-1]))  # a decoder layer this pipeline rank holds
    attached, todo = 0, set(bits) & held
    for name, module in model.named_modules():
        if not name.endswith("self_attn.o_proj") or _layer_of(name) not in bits:
            continue
        if not hasattr(module, GRANT_BUFFER_ATTR):
            continue
        size = getattr(module, "input_size", None)
        layer = _layer_of(name)
        if size is not None and size != bits[layer].shape[0]:
            raise GuardError(f"{name}: {size} input columns, the manifest's sealed heads "
                             f"assume {bits[layer].shape[0]}")
        _attach(model, name, module, HEAD_BITS_ATTR, bits[layer], rank, world)
        todo.discard(layer)
        attached += 1
    if grants_on and todo:
        raise GuardError(f"layers {sorted(todo)} have sealed heads, but no o_proj this plugin "
                         "can mask per request (vLLM's Llama/Qwen2/Mistral "
                         "self_attn.o_proj; not --model-impl transformers)")
    check_placement(model)
    return attached


def refuse_unmasked_grants(model: nn.Module) -> None:
    """Grants on: every MLP activation must be the masked op, or that layer's locked neurons
    would answer every request (vLLM's Transformers backend builds ``nn.SiLU`` instead)."""
    plain = [name for name, m in model.named_modules()
             if name.endswith("mlp.act_fn") and not hasattr(m, GRANT_BUFFER_ATTR)]
    if plain:
        raise GuardError(f"{plain[0]} is not the masked activation this plugin serves grants "
                         "with (use vLLM's own Llama/Qwen2/Mistral implementation, not "
                         "--model-impl transformers)")


# Speculative methods whose drafts come from the request's own tokens only.
SPECULATION_UNDER_GRANTS = ("ngram", "ngram_gpu", "suffix")
# KV connectors that key blocks by the salted prefix hashes (the salt is per grant set).
KV_CONNECTORS_UNDER_GRANTS = ("OffloadingConnector", "SimpleCPUOffloadConnector")


def refuse_configs_that_bypass_grants(heads: dict[int, torch.Tensor]) -> None:
    """vLLM features that would compute a request with other requests' grants, or not mask
    at all, refused in one line while grants are on."""
    from vllm.config import get_current_vllm_config_or_none

    cfg = get_current_vllm_config_or_none()
    if cfg is None:
        return
    if heads and cfg.lora_config is not None:
        # LoRA layers wrap o_proj after loading and call its weights directly
        raise GuardError("a sealed capability's heads cannot be masked per request with "
                         "--enable-lora (LoRA wraps the attention output projection); serve "
                         "without LoRA")
    if cfg.parallel_config.use_ubatching:
        raise GuardError("per-request grants cannot run micro-batches (--enable-dbo, "
                         "--ubatch-size): each reads the step's grant buffer from its start, "
                         "so one would be masked by other requests' grants")
    # Plain attribute reads: a vLLM that renames one fails the load, not the check.
    spec = cfg.speculative_config
    method = spec.method if spec is not None else None
    if method == "draft_model":
        raise GuardError("per-request grants cannot run a draft model: it would read the "
                         "target's per-token grants in another token layout, so how many of "
                         "a request's draft tokens are accepted would depend on other "
                         "requests' grants (a timing channel)")
    if method == "suffix" and spec.suffix_decoding_max_cached_requests != 0:
        raise GuardError("per-request grants cannot run suffix speculation with a cache of "
                         "past responses (it drafts from other requests' outputs); set "
                         "suffix_decoding_max_cached_requests to 0")
    if spec is not None and method not in SPECULATION_UNDER_GRANTS:
        raise GuardError(f"per-request grants cannot run speculative method {method!r}: its "
                         "drafter's layers would not be masked by the request's own grants; "
                         f"use one of {', '.join(SPECULATION_UNDER_GRANTS)}")
    kv = cfg.kv_transfer_config
    connector = kv.kv_connector if kv is not None else None
    if connector is not None and connector not in KV_CONNECTORS_UNDER_GRANTS:
        raise GuardError(f"per-request grants cannot run KV connector {connector!r}: it can "
                         "hand a request KV computed under other grants; use "
                         f"{' or '.join(KV_CONNECTORS_UNDER_GRANTS)} or none")
    if cfg.ec_transfer_config is not None:
        raise GuardError("per-request grants cannot run an encoder-cache connector "
                         "(--ec-transfer-config)")
    events = cfg.kv_events_config
    if events is not None and events.enable_kv_cache_events:
        raise GuardError("per-request grants cannot publish KV cache events: each event "
                         "carries the tokens of every request, to any subscriber")
    if cfg.model_config.enable_sleep_mode:
        raise GuardError("per-request grants cannot run with --enable-sleep-mode: the grant "
                         "and head tables are not restored on wake-up")
    if cfg.use_v2_model_runner:
        raise GuardError("per-request grants need vLLM's V1 model runner (set "
                         "VLLM_USE_V2_MODEL_RUNNER=0, as vllm-guard serve does; "
                         "watermarking and HiSparse force V2)")


def check_placement(model: nn.Module) -> None:
    """Refuse to serve if a bit table or grant buffer is not where its layer computes (the
    kernel would read a pointer of another device)."""
    for name, module in model.named_modules():
        for attr in (NEURON_BITS_ATTR, HEAD_BITS_ATTR):
            table = getattr(module, attr, None)
            if table is None:
                continue
            device = param_device(model, name)
            buffer = getattr(module, GRANT_BUFFER_ATTR, None)
            for what, t in (("bit table", table), ("grant buffer", buffer)):
                if isinstance(t, torch.Tensor) and t.device != device:
                    raise GuardError(f"{name}: {what} is on {t.device}, its layer on {device}")


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

    def _model_dir(self, model_config: ModelConfig) -> Path:
        """The checkpoint: option ``checkpoint`` when ``vllm-guard serve`` pointed --model at
        its private copy of the side files (vllm_guard.cli.staging), else --model."""
        root = Path(self.config.checkpoint or model_config.model)
        if not root.is_dir():
            raise ManifestError(f"--load-format secneuron needs a local model directory, "
                                f"got {root}")
        return root

    def _where(self, model_config: ModelConfig) -> str:
        return self.config.checkpoint or model_config.model

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        start = time.perf_counter()
        try:
            report, manifest = self._load(model, model_config)
        except GuardError as e:
            # One clear line for operators; vLLM prints the traceback after it.
            logger.error("vllm-guard: refusing to load %s: %s", self._where(model_config), e)
            raise
        GRANT_STATE.task_bits = dict(manifest.tasks)
        rank, world = _tp()
        attached = attach_neuron_bits(model, neuron_bits(manifest), rank, world)
        heads = head_bits(manifest)
        grants_on = bool(envs.get(envs.GRANTS))
        try:
            if grants_on:
                refuse_unmasked_grants(model)
                refuse_configs_that_bypass_grants(heads)
            masked_heads = attach_head_bits(model, heads, rank, world, grants_on)
        except GuardError as e:
            logger.error("vllm-guard: refusing to load %s: %s", self._where(model_config), e)
            raise
        self._log(report, attached, masked_heads)
        # Same wording as vLLM's DefaultModelLoader, so benchmarks compare like with like.
        logger.info("vllm-guard secneuron: Loading weights took %.2f seconds",
                    time.perf_counter() - start)

    def _load(self, model: nn.Module, model_config: ModelConfig):
        root = self._model_dir(model_config)
        # the checks `vllm-guard serve` ran before exec'ing vLLM, again: the files may have
        # changed since, and vLLM's own entry points start this loader without serve
        opened = open_for_serving(root, self.config)
        manifest, keys, data_keys = opened.manifest, opened.keys, opened.data_keys
        served = Path(model_config.model)
        if served.resolve() != root.resolve():
            # what vLLM read config and tokenizer from must be those signed files, unchanged
            check_copy(served, manifest, self.config.workers)
        if not keys:
            logger.warning("vllm-guard: no task keys given: serving the PUBLIC-ONLY model, every "
                           "locked task (%s) is zeroed", ", ".join(sorted(manifest.tasks)))
        stats = OpenReport(sorted(keys), sorted(data_keys),
                           [g.id for g in manifest.groups if g.id not in data_keys], 0, 0.0,
                           layer_counts(manifest, data_keys))
        loaded = self._load_in_place(model, root, manifest, data_keys, stats)
        if loaded is _NOT_PLACED:
            with ExitStack() as stack:
                weights = stream_weights(root, manifest, data_keys, self.config, stats, stack)
                loaded = model.load_weights(weights)
        if isinstance(loaded, set):
            missing = {n for n, _ in model.named_parameters()} - loaded
            if missing:
                raise ManifestError(f"checkpoint lacks weights for {sorted(missing)[:5]}")
        return stats, manifest

    def _load_in_place(self, model: nn.Module, root: Path, manifest, data_keys: dict,
                       stats: OpenReport) -> object:
        """One copy: each tensor read from its file straight into the parameter vLLM would
        copy it into, hashed and decrypted there. ``_NOT_PLACED`` when the model's weight
        loaders do more than a plain copy (then the stream and ``load_weights`` as before)."""
        if self.config.verify_weights and not all(manifest.files[n].blocks
                                                  for n in weight_files(manifest)):
            return _NOT_PLACED  # hand-made whole-file digests: checked by the stream
        shards = open_shards(root, manifest)
        try:
            plan = capture_placement(model, [(e.name, e.dtype, e.shape)
                                             for s in shards for e in s.entries])
            if plan.refused:
                logger.info("vllm-guard secneuron: loading through load_weights (%s)",
                            plan.refused)
                return _NOT_PLACED
            load_in_place(shards, manifest, data_keys, self.config, stats, plan.dest)
            return plan.loaded
        finally:
            for s in shards:
                s.close()

    @staticmethod
    def _log(report: OpenReport, attached: int, masked_heads: int) -> None:
        per_layer = json.dumps({str(k): v for k, v in sorted(report.per_layer.items())})
        logger.info("vllm-guard secneuron: checked %.1f MB of weights against the signed "
                    "manifest (BLAKE3 per block)%s", report.bytes_verified / 1e6,
                    "" if report.bytes_verified else " (verify_weights off: sizes only)")
        logger.info("vllm-guard secneuron: open tasks %s; groups open %d, locked %d; "
                    "decrypted %.1f MB in %.3f s (%.2f GB/s); neuron tables on %d MLPs",
                    report.tasks or "none (public only)", len(report.opened_groups),
                    len(report.locked_groups), report.bytes_decrypted / 1e6, report.seconds,
                    report.gb_per_s, attached)
        if masked_heads:
            logger.info("vllm-guard secneuron: sealed heads masked per request on %d attention "
                        "output projections (open tasks: %s)", masked_heads,
                        report.tasks or "none")
        logger.info("vllm-guard secneuron neurons per layer (public/open/locked): %s", per_layer)


def register_secneuron_loader() -> None:
    from vllm.model_executor.model_loader import register_model_loader

    register_model_loader("secneuron")(SecNeuronModelLoader)

