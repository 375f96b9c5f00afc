"""The fixture builder is deterministic and needs no network."""

from __future__ import annotations

import hashlib
import json

from harness.fixtures import build_fixture


def digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_same_seed_gives_byte_identical_weights(tiny_model, tmp_path):
    rebuilt = build_fixture(tmp_path / "again", "tiny", seed=0)
    assert digest(rebuilt) == digest(tiny_model)
    assert (rebuilt / "tokenizer.json").read_bytes() == (tiny_model / "tokenizer.json").read_bytes()


def test_other_seed_differs_and_shape_is_vllm_friendly(tiny_model, tmp_path):
    other = build_fixture(tmp_path / "other", "tiny", seed=1)
    assert digest(other) != digest(tiny_model)
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert cfg["hidden_size"] // cfg["num_attention_heads"] in (32, 64, 80, 96, 112, 128, 256)
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert "chat_template" in json.loads((tiny_model / "tokenizer_config.json").read_text()) or (
        tiny_model / "chat_template.jinja").exists()
