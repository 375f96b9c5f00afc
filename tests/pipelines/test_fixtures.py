"""The fixture builder is deterministic and needs no network; the offline toolchain's CLI and
the ciphertext detector on the trained fixture."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from dataclasses import replace

from harness.fixtures import PRESETS, build_fixture
from tests.unit.secneuron.test_toolchain import TASKS, cli
from vllm_guard.secneuron.checkpoint import ffn_layout, load_checkpoint
from vllm_guard.secneuron.detector import scan_tensors
from vllm_guard.secneuron.keys import load_task_key
from vllm_guard.secneuron.selection import Selection


def digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_same_seed_gives_byte_identical_weights(tiny_model, tmp_path):
    rebuilt = build_fixture(tmp_path / "again", "tiny", seed=0)
    assert digest(rebuilt) == digest(tiny_model)
    assert (rebuilt / "tokenizer.json").read_bytes() == (tiny_model / "tokenizer.json").read_bytes()


def test_other_seed_differs_and_shape_is_vllm_friendly(tiny_model, tmp_path):
    short = replace(PRESETS["tiny"], train_steps=5)  # the seed matters, not the training
    one, other = (build_fixture(tmp_path / f"s{seed}", short, seed=seed) for seed in (0, 1))
    assert digest(one) != digest(other)
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert cfg["hidden_size"] // cfg["num_attention_heads"] in (32, 64, 80, 96, 112, 128, 256)
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert "chat_template" in json.loads((tiny_model / "tokenizer_config.json").read_text()) or (
        tiny_model / "chat_template.jinja").exists()


def test_detector_no_false_positives_on_trained_fixture(tiny_model):
    ckpt = load_checkpoint(tiny_model)
    assert sum(int(v.encrypted.sum()) for v in scan_tensors(ckpt.tensors, ffn_layout(ckpt))) == 0


def test_cli_keygen_extract_lock_inspect(tiny_model, tmp_path):
    from harness.fixtures import task_examples

    calib = []
    for t in TASKS:
        path = tmp_path / f"{t}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in task_examples(t, 40, seed=7)))
        calib += ["--task", f"{t}={path}"]
        res = cli("keygen", "--task", t, "--out", tmp_path / f"{t}.key")
        assert res.returncode == 0, res.stderr
        assert stat.S_IMODE((tmp_path / f"{t}.key").stat().st_mode) == 0o600
        key = load_task_key(tmp_path / f"{t}.key").key
        assert key.hex() not in res.stdout and base64.b64encode(key).decode() not in res.stdout
    assert cli("keygen", "--signing", "--out", tmp_path / "pub.pem").returncode == 0
    res = cli("extract", "--model", tiny_model, *calib, "--fraction", "0.05", "--lambda", "0.8",
              "--out", tmp_path / "sel.json")
    assert res.returncode == 0, res.stderr
    assert "importance[add]" in res.stderr  # progress bar
    summary = json.loads(res.stdout.splitlines()[0])
    sel = Selection.load(tmp_path / "sel.json")
    assert summary["task_specific"] + summary["shared"] + summary["public"] == 2 * 512
    assert all(len(sel.neurons[0][t]) == round(0.05 * 512) for t in TASKS)
    keys = [f"--key={t}={tmp_path / f'{t}.key'}" for t in TASKS]
    res = cli("lock", "--model", tiny_model, "--selection", tmp_path / "sel.json", *keys,
              "--signing-key", tmp_path / "pub.pem", "--out", tmp_path / "locked")
    assert res.returncode == 0, res.stderr
    res = cli("inspect", "--model", tmp_path / "locked", "--json")
    report = json.loads(res.stdout)
    locked_n = sum(g["neurons"] for g in report["manifest"]["groups"])
    assert report["encrypted_neurons"] == locked_n > 0
    assert report["manifest"]["signature"] == "valid (embedded key)"
    res = cli("inspect", "--model", tiny_model)
    assert "manifest: none" in res.stdout and "verdict: 0 neurons look encrypted" in res.stdout
    res = cli("unlock", "--model", tmp_path / "locked", "--key", tmp_path / "nokey.key",
              "--out", tmp_path / "u")
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
    assert "cannot read task key file" in res.stderr and not (tmp_path / "u").exists()
