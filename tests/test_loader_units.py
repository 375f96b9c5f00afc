"""Loader pieces that need no server: TP sharding of neuron tables, config parsing."""

from __future__ import annotations

import pytest
import torch

from vllm_guard.errors import GuardError
from vllm_guard.loader.secneuron_loader import (
    SecNeuronLoadConfig,
    attach_neuron_bits,
    tp_shard,
)


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
    env_cfg = SecNeuronLoadConfig.from_extra({}, env={"VLLM_GUARD_KEYS": "x.key:y.key"})
    assert env_cfg.keys == ("x.key", "y.key")
    with pytest.raises(GuardError, match="unknown secneuron loader option"):
        SecNeuronLoadConfig.from_extra({"key": "typo"}, env={})
