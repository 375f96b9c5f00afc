"""Loader pieces that need no server: TP sharding of neuron tables, config parsing."""

from __future__ import annotations

import pytest
import torch

from tests.unit.secneuron.test_signed_checkpoint import locked, run_loader  # noqa: F401
from vllm_guard.errors import DecryptionError, GuardError
from vllm_guard.loader.secneuron_loader import attach_neuron_bits, tp_shard
from vllm_guard.secneuron.keys import TaskKey, load_task_key, save_task_key
from vllm_guard.secneuron.options import SecNeuronLoadConfig


def test_tp_shard_maps_neuron_indices_to_ranks():
    bits = torch.arange(12, dtype=torch.int64)
    assert tp_shard(bits, 0, 1).tolist() == list(range(12))
    assert tp_shard(bits, 1, 3).tolist() == [4, 5, 6, 7]
    with pytest.raises(GuardError, match="not divisible"):
        tp_shard(bits, 0, 5)


def test_attach_keeps_tensor_identity_for_compiled_graphs():
    mlp = torch.nn.Module()
    mlp.act_fn = torch.nn.Module()
    model = torch.nn.Module()  # named like vLLM's: model.layers.0.mlp.act_fn
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.model.layers[0].mlp = mlp
    assert attach_neuron_bits(model, {0: torch.full((4,), 7)}) == 1
    table = mlp.act_fn.guard_neuron_bits
    attach_neuron_bits(model, {0: torch.tensor([1, 2, 3, 4])})
    assert mlp.act_fn.guard_neuron_bits is table and table.tolist() == [1, 2, 3, 4]


def test_loader_config_from_extra_and_env(tmp_path):
    cfg = SecNeuronLoadConfig.from_extra({"keys": ["a.key"], "key_dir": "kd",
                                          "publisher_key": "p.pub"}, env={})
    assert cfg.keys == ("a.key", "kd") and cfg.publisher_key == "p.pub"
    assert cfg.allow_unsigned is False and cfg.workers is None
    env_cfg = SecNeuronLoadConfig.from_extra(
        {}, env={"VLLM_GUARD_KEYS": "x.key:y.key", "VLLM_GUARD_PUBLISHER_KEY": "e.pub"})
    assert env_cfg.keys == ("x.key", "y.key") and env_cfg.publisher_key == "e.pub"
    one = SecNeuronLoadConfig.from_extra({"keys": "k.key", "allow_unsigned": True,
                                          "workers": 2}, env={"VLLM_GUARD_KEYS": "x.key"})
    assert (one.keys, one.allow_unsigned, one.workers) == (("k.key",), True, 2)


@pytest.mark.parametrize("extra,key", [
    ({"allow_unsigned": "false"}, "'allow_unsigned'"),  # a truthy string must not mean true
    ({"allow_unsigned": 0}, "'allow_unsigned'"),
    ({"workers": "2"}, "'workers'"),
    ({"workers": 2.0}, "'workers'"),
    ({"workers": 0}, "'workers'"),
    ({"key": "typo"}, "'key'"),
    ({"keys": ["a.key", 3]}, "'keys'"),
    ({"keys": {"a": "b"}}, "'keys'"),
    ({"key_dir": ["kd"]}, "'key_dir'"),
    ({"publisher_key": True}, "'publisher_key'"),
    ({"keys": [""]}, "'keys'"),
])
def test_loader_config_refuses_bad_options_naming_the_key(extra, key):
    with pytest.raises(GuardError) as e:
        SecNeuronLoadConfig.from_extra(extra, env={})
    msg = str(e.value)
    assert key in msg and "--model-loader-extra-config" in msg and "\n" not in msg, msg


def _mlp_model(device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """model.layers.0.mlp.{down_proj, act_fn}, with the MLP's parameters on ``device``."""
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([torch.nn.Module()])
    mlp = model.model.layers[0].mlp = torch.nn.Module()
    with torch.device(device):
        mlp.down_proj = torch.nn.Linear(4, 4, bias=False)
    mlp.act_fn = torch.nn.Module()
    return model, mlp


def test_tables_and_grant_buffer_follow_the_parameters_device(monkeypatch):
    """vLLM calls load_weights outside its target-device block: tables built there are on the
    CPU while the MLP computes elsewhere. They must be placed on the parameters' device, and
    the grant buffer too (the meta device stands in for a GPU)."""
    from vllm_guard.runtime import GRANT_BUFFER_ATTR
    from vllm_guard.runtime.grant_state import GrantState

    state = GrantState()
    monkeypatch.setattr("vllm_guard.loader.secneuron_loader.GRANT_STATE", state)
    model, mlp = _mlp_model("meta")
    setattr(mlp.act_fn, GRANT_BUFFER_ATTR, state.ensure_buffer(8))  # made on the CPU
    assert attach_neuron_bits(model, {0: torch.tensor([1, 2, 3, 4])}) == 1
    assert mlp.act_fn.guard_neuron_bits.device.type == "meta"
    assert getattr(mlp.act_fn, GRANT_BUFFER_ATTR).device.type == "meta"
    assert state.buffer is getattr(mlp.act_fn, GRANT_BUFFER_ATTR)  # the runner fills this one


def test_misplaced_table_refuses_to_serve():
    from vllm_guard.loader.secneuron_loader import check_placement

    model, mlp = _mlp_model("meta")
    mlp.act_fn.guard_neuron_bits = torch.tensor([1, 2, 3, 4])  # CPU table, meta MLP
    with pytest.raises(GuardError, match="bit table is on cpu, its layer on meta"):
        check_placement(model)


def test_loader_refuses_wrong_key_bytes_in_one_line(locked, keydir, tmp_path):  # noqa: F811
    """The in-engine refusal behind serve's check (vLLM's own entry points skip serve):
    right key id, wrong bytes."""
    real = load_task_key(keydir / "capital.key")
    save_task_key(TaskKey("capital", real.key_id, bytes(32)), tmp_path / "wrong.key")
    with pytest.raises(DecryptionError, match=r"task key 'capital' .* does not open group"):
        run_loader(locked, keydir, keys=[str(tmp_path / "wrong.key")])  # one refusal line


def test_loader_options_live_apart_from_the_checks_frozen_and_torch_free():
    """The option dataclasses are their own module (secneuron.options): frozen, strict, and
    importable without torch or the checkpoint checks (serve parses them before vLLM)."""
    import dataclasses

    from tests.unit.cli.test_lazy import fresh_python
    from vllm_guard.secneuron import options, preflight

    for cls in (options.DetectorConfig, options.LoaderExtraConfig, options.SecNeuronLoadConfig):
        assert cls.__module__ == "vllm_guard.secneuron.options"
        assert cls.__dataclass_params__.frozen, cls  # type: ignore[attr-defined]
    assert not hasattr(preflight, "LoaderExtraConfig")
    cfg = options.SecNeuronLoadConfig.from_extra({"keys": "k.key"}, env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.keys = ()  # type: ignore[misc]
    loaded, _ = fresh_python("import vllm_guard.secneuron.options")
    assert loaded == [], loaded


def test_loader_reads_weights_from_checkpoint_and_checks_the_copy_vllm_read(
        locked, keydir, tmp_path):  # noqa: F811
    """Behind ``vllm-guard serve``: --model is the private copy of the side files, option
    ``checkpoint`` the checkpoint. The weights come from the checkpoint; the copy must be
    exactly its signed side files, unchanged (vLLM read config and tokenizer from it)."""
    import shutil

    from vllm_guard.errors import ManifestError
    from vllm_guard.secneuron.files import copy_verified, side_files
    from vllm_guard.secneuron.manifest import read_manifest

    manifest = read_manifest(locked)
    copy = tmp_path / "copy"
    copy.mkdir()
    copy_verified(locked, manifest, side_files(manifest), copy)
    direct = run_loader(locked, keydir)
    via_copy = run_loader(copy, keydir, checkpoint=str(locked))
    assert direct.keys() == via_copy.keys()
    assert all(torch.equal(direct[k], via_copy[k]) for k in direct)
    (copy / "tokenizer_config.json").write_text('{"chat_template": "{{ 1 }}"}')
    with pytest.raises(ManifestError, match="tokenizer_config.json does not match"):
        run_loader(copy, keydir, checkpoint=str(locked))
    (copy / "tokenizer_config.json").unlink()
    with pytest.raises(ManifestError, match=r"not a copy .*tokenizer_config.json missing"):
        run_loader(copy, keydir, checkpoint=str(locked))
    shutil.copy(locked / "tokenizer_config.json", copy)
    shutil.copy(locked / "model.safetensors", copy)  # a weight beside the copy: refused
    with pytest.raises(ManifestError, match=r"not a copy .*model.safetensors added"):
        run_loader(copy, keydir, checkpoint=str(locked))


def _attention_model(maskable: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """model.layers.{0,1}.self_attn.o_proj (input 8) beside masked MLP act ops (grants on);
    ``maskable``: the o_proj is the masked one (has a grant buffer), as kernels.layer builds."""
    from vllm_guard.runtime import GRANT_BUFFER_ATTR

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList()
    for _ in range(2):
        layer = torch.nn.Module()
        layer.self_attn = torch.nn.Module()
        layer.self_attn.o_proj = torch.nn.Linear(8, 4)
        layer.self_attn.o_proj.input_size = 8
        layer.mlp = torch.nn.Module()
        layer.mlp.act_fn = torch.nn.Module()
        setattr(layer.mlp.act_fn, GRANT_BUFFER_ATTR, torch.zeros(4, dtype=torch.int64))
        if maskable:
            setattr(layer.self_attn.o_proj, GRANT_BUFFER_ATTR, torch.zeros(4, dtype=torch.int64))
        model.model.layers.append(layer)
    return model, model.model.layers[1].self_attn.o_proj


def test_sealed_heads_get_a_column_table_on_their_o_proj_only():
    from vllm_guard.loader.secneuron_loader import attach_head_bits
    from vllm_guard.secneuron.manifest import Group, Manifest, Slice
    from vllm_guard.secneuron.neuron_bits import head_bits

    model, o_proj = _attention_model(maskable=True)
    o = Slice("model.layers.1.self_attn.o_proj.weight", "m.safetensors", 1, 1, "F32", [4, 8], [])
    groups = [Group("g0", ["rev"], {}, [o], attn={1: [4, 5, 6, 7]}),
              Group("g1", ["up"], {}, [o], attn={1: [2, 3]})]
    manifest = Manifest("id", {"inc": 0, "rev": 1, "up": 2}, {}, groups)
    # every sealed group, open or not (g1's heads may be locked: zero weights, masked all the
    # same, so the traced graph does not depend on the keys a server holds)
    bits = head_bits(manifest)
    assert set(bits) == {1} and bits[1].tolist() == [-1] * 2 + [4] * 2 + [2] * 4
    assert attach_head_bits(model, bits) == 1
    assert o_proj.guard_head_bits.tolist() == [-1] * 2 + [4] * 2 + [2] * 4
    assert not hasattr(model.model.layers[0].self_attn.o_proj, "guard_head_bits")


def test_open_sealed_heads_without_a_maskable_o_proj_are_refused_under_grants():
    """Grants on but this o_proj cannot mask per request: the opened heads would answer
    every request, whatever its grant."""
    from vllm_guard.loader.secneuron_loader import attach_head_bits

    model, _ = _attention_model(maskable=False)
    with pytest.raises(GuardError, match=r"layers \[1\] have sealed heads"):
        attach_head_bits(model, {1: torch.full((8,), -1)})
    with pytest.raises(GuardError, match="8 input columns"):
        attach_head_bits(_attention_model(maskable=True)[0], {1: torch.full((6,), -1)})


def test_a_layer_on_another_pipeline_rank_needs_no_o_proj_here():
    from vllm.model_executor.models.utils import PPMissingLayer

    from vllm_guard.loader.secneuron_loader import attach_head_bits

    model, o_proj = _attention_model(maskable=True)
    model.model.layers[0] = PPMissingLayer()  # layer 0 lives on another pipeline rank
    assert attach_head_bits(model, {0: torch.full((8,), -1), 1: torch.full((8,), -1)}) == 1
    assert hasattr(o_proj, "guard_head_bits")


def test_grants_refuse_an_activation_or_config_that_would_not_mask(monkeypatch):
    """vLLM's Transformers backend builds nn.SiLU, not the masked activation; LoRA wraps
    o_proj and calls its weights directly; micro-batches read the grant buffer from its
    start; a draft model reads it in another token layout; suffix speculation drafts from
    other requests' outputs; KV connectors and KV events hand out or publish other requests'
    KV and tokens; sleep mode drops the tables; the V2 runner never runs the grant hook:
    each would compute a request with no mask or with other requests' grants (or leak
    them)."""
    from types import SimpleNamespace

    import vllm.config

    from vllm_guard.loader.secneuron_loader import (
        refuse_configs_that_bypass_grants,
        refuse_unmasked_grants,
    )
    from vllm_guard.runtime import GRANT_BUFFER_ATTR

    model, _ = _attention_model(maskable=True)
    refuse_unmasked_grants(model)
    delattr(model.model.layers[1].mlp.act_fn, GRANT_BUFFER_ATTR)
    with pytest.raises(GuardError, match="layers.1.mlp.act_fn is not the masked activation"):
        refuse_unmasked_grants(model)

    def config(lora=None, ubatching=False, method=None, suffix_cache=0, connector=None,
               ec=None, events=False, sleep=False, v2=False) -> SimpleNamespace:
        spec = method and SimpleNamespace(method=method,
                                          suffix_decoding_max_cached_requests=suffix_cache)
        return SimpleNamespace(
            lora_config=lora, parallel_config=SimpleNamespace(use_ubatching=ubatching),
            speculative_config=spec,
            kv_transfer_config=connector and SimpleNamespace(kv_connector=connector),
            ec_transfer_config=ec,
            kv_events_config=SimpleNamespace(enable_kv_cache_events=events),
            model_config=SimpleNamespace(enable_sleep_mode=sleep), use_v2_model_runner=v2)

    heads = {1: torch.full((8,), -1)}
    for cfg, refused in ((config(), None), (config(lora=object()), "--enable-lora"),
                         (config(ubatching=True), "micro-batches"),
                         (config(method="draft_model"), "draft model"),
                         (config(method="ngram"), None), (config(method="ngram_gpu"), None),
                         (config(method="eagle3"), "'eagle3'"),
                         (config(method="mtp"), "'mtp'"),
                         (config(method="suffix", suffix_cache=10000), "past responses"),
                         (config(method="suffix"), None),
                         (config(connector="NixlConnector"), "'NixlConnector'"),
                         (config(connector="LMCacheConnectorV1"), "KV connector"),
                         (config(connector="OffloadingConnector"), None),
                         (config(ec=object()), "encoder-cache"),
                         (config(events=True), "KV cache events"),
                         (config(sleep=True), "sleep-mode"),
                         (config(v2=True), "V1 model runner")):
        monkeypatch.setattr(vllm.config, "get_current_vllm_config_or_none", lambda c=cfg: c)
        if refused is None:
            refuse_configs_that_bypass_grants(heads)
        else:
            with pytest.raises(GuardError, match=refused):
                refuse_configs_that_bypass_grants(heads)
    monkeypatch.setattr(vllm.config, "get_current_vllm_config_or_none",
                        lambda: config(lora=object()))
    refuse_configs_that_bypass_grants({})  # no sealed heads: LoRA is fine
