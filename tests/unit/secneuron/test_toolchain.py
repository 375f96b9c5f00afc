"""SecNeuron offline toolchain: lock/unlock/rotate/inspect/extract and their failure modes."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.fixtures import PRESETS, build_fixture
from vllm_guard.errors import DecryptionError, KeyFileError, ManifestError, SignatureError
from vllm_guard.secneuron.checkpoint import (
    ffn_layout,
    gather_neurons,
    load_checkpoint,
    scatter_neurons,
)
from vllm_guard.secneuron.crypto import encrypt_in_place
from vllm_guard.secneuron.detector import scan_layer, scan_tensors
from vllm_guard.secneuron.keys import (
    TaskKey,
    generate_signing_key,
    load_public_key,
    load_signing_key,
    load_task_key,
    save_task_key,
)
from vllm_guard.secneuron.lock import lock_checkpoint
from vllm_guard.secneuron.manifest import MANIFEST_NAME, Manifest, read_manifest, write_manifest
from vllm_guard.secneuron.open import decrypt_in_place
from vllm_guard.secneuron.preflight import open_data_keys
from vllm_guard.secneuron.selection import Selection, policy_tree
from vllm_guard.secneuron.unlock import unlock_checkpoint

TASKS = ["add", "capital", "reverse"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vllm_guard.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def keys_for(keydir: Path, tasks) -> dict[str, TaskKey]:
    return {t: load_task_key(keydir / f"{t}.key") for t in tasks}


def synthetic_selection(layers: int, size: int, seed: int = 0) -> Selection:
    """Overlapping random picks, so single-task and shared groups both exist."""
    rng = random.Random(seed)
    return Selection(TASKS, {
        layer: {t: sorted(rng.sample(range(size), size // 8)) for t in TASKS}
        for layer in range(layers)
    })


@pytest.fixture(scope="module", params=["float32", "float16", "bfloat16"])
def locked(request, tmp_path_factory, keydir):
    """(plain dir, locked dir, selection) for a random tiny checkpoint in each dtype."""
    root = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    preset = replace(PRESETS["tiny"], train_steps=0, dtype=request.param)
    plain = build_fixture(root / "plain", preset, seed=3)
    selection = synthetic_selection(preset.num_hidden_layers, preset.intermediate_size)
    out = root / "locked"
    lock_checkpoint(plain, selection, keys_for(keydir, TASKS), out,
                    load_signing_key(keydir / "publisher.pem"), chunk_bytes=4096, progress=False)
    return plain, out, selection


def file_hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.glob("*.safetensors")}


def test_locked_dir_is_a_complete_model_with_same_shapes(locked):
    plain, out, _ = locked
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", MANIFEST_NAME):
        assert (out / name).exists(), name
    a, b = load_file(plain / "model.safetensors"), load_file(out / "model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype)
                                                             for k, v in b.items()}
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(plain) == size(out)
    assert file_hashes(plain) != file_hashes(out)  # something really was encrypted


def test_unlock_all_keys_is_bit_identical(locked, keydir, tmp_path):
    plain, out, _ = locked
    unlock_checkpoint(out, keys_for(keydir, TASKS), tmp_path / "u",
                      load_public_key(keydir / "publisher.pub"))
    a, b = load_file(plain / "model.safetensors"), load_file(tmp_path / "u" / "model.safetensors")
    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    assert not (tmp_path / "u" / MANIFEST_NAME).exists()


def _neuron_slices(tensors, layers, layer, idx):
    info = layers[layer]
    idx = torch.tensor(idx, dtype=torch.long)
    return [tensors[info.gate][idx], tensors[info.up][idx], tensors[info.down][:, idx]]


@pytest.mark.parametrize("granted", [["add"], ["capital", "reverse"], []])
def test_unlock_subset_and_collusion(locked, keydir, tmp_path, granted):
    plain, out, selection = locked
    unlock_checkpoint(out, keys_for(keydir, granted), tmp_path / "u")
    orig = load_checkpoint(plain).tensors
    got = load_checkpoint(tmp_path / "u").tensors
    layers = ffn_layout(load_checkpoint(plain))
    groups = policy_tree(selection)
    opened = {g.id for g in groups if set(g.policy) & set(granted)}
    # collusion: keys for several tasks open exactly the groups whose policy names one of them
    assert set(open_data_keys(read_manifest(out), keys_for(keydir, granted))) == opened
    locked_neurons: dict[int, set[int]] = {}
    for g in groups:
        for layer, idx in g.neurons.items():
            locked_neurons.setdefault(layer, set()).update(idx)
            for a, b in zip(_neuron_slices(orig, layers, layer, idx),
                            _neuron_slices(got, layers, layer, idx), strict=True):
                if g.id in opened:
                    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), g.id
                else:
                    assert torch.count_nonzero(b) == 0, g.id
    for layer, info in layers.items():
        public = sorted(set(range(info.intermediate_size)) - locked_neurons[layer])
        for a, b in zip(_neuron_slices(orig, layers, layer, public),
                        _neuron_slices(got, layers, layer, public), strict=True):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    other = [k for k in orig if ".mlp." not in k]
    assert all(torch.equal(orig[k], got[k]) for k in other)


def _no_partial(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".partial-" in p.name]


def test_wrong_unknown_and_broken_keys_fail_clearly(locked, keydir, tmp_path):
    _, out, _ = locked
    # a fresh key for a known task: wrong key id
    with pytest.raises(KeyFileError, match="key for task 'add' has key id"):
        unlock_checkpoint(out, {"add": TaskKey.generate("add")}, tmp_path / "u1")
    # wrong key bytes under the right key id: the wrapped data key does not open
    real = load_task_key(keydir / "add.key")
    forged = TaskKey("add", real.key_id, os.urandom(32))
    with pytest.raises(DecryptionError, match=r"task key 'add' .* does not open group g\d+"):
        unlock_checkpoint(out, {"add": forged}, tmp_path / "u2")
    with pytest.raises(KeyFileError, match="unknown task 'poetry'"):
        unlock_checkpoint(out, {"poetry": TaskKey.generate("poetry")}, tmp_path / "u3")
    text = (keydir / "add.key").read_text()
    (tmp_path / "trunc.key").write_text(text[: len(text) // 2])
    with pytest.raises(KeyFileError, match="truncated or garbled"):
        load_task_key(tmp_path / "trunc.key")
    (tmp_path / "garbled.key").write_text(text.replace('"key": "', '"key": "!!'))
    with pytest.raises(KeyFileError, match="truncated or garbled"):
        load_task_key(tmp_path / "garbled.key")
    assert not any((tmp_path / f"u{i}").exists() for i in (1, 2, 3)) and _no_partial(tmp_path)


def _copy_locked(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _rehash(d: Path, doc: dict | None = None) -> dict:
    """The manifest document with its file hashes made to match ``d`` (signature untouched)."""
    doc = doc or json.loads((d / MANIFEST_NAME).read_text())
    for name in doc["body"]["files"]:
        data = (d / name).read_bytes()
        doc["body"]["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(),
                                      "size": len(data)}
    return doc


def test_flipped_ciphertext_byte_names_tensor_group_chunk(locked, keydir, tmp_path):
    _, out, _ = locked
    bad = _copy_locked(out, tmp_path / "bad")
    manifest = read_manifest(bad)
    g = manifest.groups[0]
    sl = g.slices[0]
    tensors = load_file(bad / "model.safetensors")
    t = tensors[sl.tensor]
    row = g.neurons[sl.layer][0]
    t.view(torch.uint8)[row, 0] ^= 0x01  # gate/up row slice of the group's first neuron
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    # first line of defence: the signed file hash
    with pytest.raises(ManifestError, match="file model.safetensors does not match its signed"):
        unlock_checkpoint(bad, keys_for(keydir, TASKS), tmp_path / "u")
    # second: the AEAD tag, even if the publisher itself signed the flipped shard
    resigned = read_manifest(bad)
    resigned.files = Manifest.from_json(_rehash(bad)).files
    resigned.sign(load_signing_key(keydir / "publisher.pem"))
    write_manifest(resigned, bad)
    with pytest.raises(DecryptionError) as e:
        unlock_checkpoint(bad, keys_for(keydir, TASKS), tmp_path / "u")
    assert f"tensor {sl.tensor}, group {g.id}, chunk 0" in str(e.value)
    assert not (tmp_path / "u").exists() and _no_partial(tmp_path)


def test_swapped_chunks_fail_even_without_signature(locked, keydir, tmp_path):
    """Swap two chunks' ciphertext *and* their nonce/tag entries: only the AAD index catches it."""
    _, out, _ = locked
    bad = _copy_locked(out, tmp_path / "bad")
    doc = json.loads((bad / MANIFEST_NAME).read_text())
    group, sl = next((g, s) for g in doc["body"]["groups"] for s in g["slices"]
                     if len(s["chunks"]) >= 3)
    sl["chunks"][0], sl["chunks"][1] = sl["chunks"][1], sl["chunks"][0]
    tensors = load_file(bad / "model.safetensors")
    t, idx = tensors[sl["tensor"]], torch.tensor(group["neurons"][str(sl["layer"])])
    sel, flat = gather_neurons(t, sl["axis"], idx)
    n = sl["chunks"][0][2]
    flat[:n], flat[n:2 * n] = flat[n:2 * n].copy(), flat[:n].copy()
    scatter_neurons(t, sl["axis"], idx, sel)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    doc = _rehash(bad, doc)  # an unsigned manifest can say anything: only the tags remain
    doc["signature"] = None
    (bad / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="unsigned"):
        unlock_checkpoint(bad, keys_for(keydir, TASKS), tmp_path / "u")
    where = f"tensor {sl['tensor']}, group {group['id']}, chunk 0"
    with pytest.raises(DecryptionError, match=where):
        unlock_checkpoint(bad, keys_for(keydir, TASKS), tmp_path / "u", allow_unsigned=True)
    assert not (tmp_path / "u").exists()


def test_edited_manifest_fails_signature(locked, keydir, tmp_path):
    _, out, _ = locked
    bad = _copy_locked(out, tmp_path / "bad")
    doc = json.loads((bad / MANIFEST_NAME).read_text())
    doc["body"]["groups"][0]["policy"] = TASKS  # widen a policy
    (bad / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="edited"):
        unlock_checkpoint(bad, keys_for(keydir, ["add"]), tmp_path / "u")
    other_pub = generate_signing_key(tmp_path / "other.pem")[1]
    with pytest.raises(SignatureError, match="other than the configured publisher"):
        read_manifest(out).verify(load_public_key(other_pub))


def test_rotation_rewraps_only_the_manifest(locked, keydir, tmp_path):
    _, out, _ = locked
    model = _copy_locked(out, tmp_path / "m")
    before = file_hashes(model)
    old = load_task_key(keydir / "capital.key")
    new = TaskKey.generate("capital")
    save_task_key(new, tmp_path / "new.key")
    res = cli("rotate", "--model", model, "--task", "capital", "--old", keydir / "capital.key",
              "--new", tmp_path / "new.key", "--signing-key", keydir / "publisher.pem")
    assert res.returncode == 0, res.stderr
    assert "does not revoke" in res.stdout
    assert read_manifest(model).version == read_manifest(out).version + 1
    assert file_hashes(model) == before
    with pytest.raises(KeyFileError):
        open_data_keys(read_manifest(model), {"capital": old})
    opened = open_data_keys(read_manifest(model), {"capital": new})
    assert opened and set(opened) == {g.id for g in read_manifest(model).groups
                                      if "capital" in g.policy}
    unlock_checkpoint(model, {"capital": new}, tmp_path / "u")
    assert read_manifest(model).signature_status() == "valid (embedded key)"


def test_detector_flags_all_remaining_ciphertext(locked, keydir):
    _, out, selection = locked
    manifest = read_manifest(out)
    ckpt = load_checkpoint(out)
    data_keys = open_data_keys(manifest, keys_for(keydir, ["add"]))
    decrypt_in_place(ckpt.tensors, manifest, data_keys, zero_locked=False)
    verdicts = {v.layer: v for v in scan_tensors(ckpt.tensors, manifest.layers)}
    for layer, v in verdicts.items():
        still = sorted({n for g in manifest.groups if g.id not in data_keys
                        for n in g.neurons.get(layer, [])})
        flagged = v.encrypted.nonzero().flatten().tolist()
        assert flagged == still  # 100% recall and no false positive on this layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_detector_false_positives_on_realistic_shapes(dtype):
    """Qwen2-0.5B FFN shapes, HF-style init (std 0.02): <=0.1% false positives, 100% recall."""
    p = PRESETS["qwen2-0.5b-shape"]
    gen = torch.Generator().manual_seed(0)
    flagged = total = 0
    for layer in range(3):
        gate = (torch.randn(p.intermediate_size, p.hidden_size, generator=gen) * 0.02).to(dtype)
        up = (torch.randn(p.intermediate_size, p.hidden_size, generator=gen) * 0.02).to(dtype)
        down = (torch.randn(p.hidden_size, p.intermediate_size, generator=gen) * 0.02).to(dtype)
        v = scan_layer(layer, gate, up, down)
        flagged += int(v.encrypted.sum())
        total += v.neurons
        idx = torch.arange(layer, p.intermediate_size, 97)
        for t, axis in ((gate, 0), (up, 0), (down, 1)):
            sel = t.index_select(axis, idx).contiguous()
            encrypt_in_place(os.urandom(32), sel.view(torch.uint8).reshape(-1).numpy(), {}, 1 << 20)
            t.index_copy_(axis, idx, sel)
        v = scan_layer(layer, gate, up, down)
        assert v.encrypted.nonzero().flatten().tolist() == idx.tolist()
    assert flagged / total <= 0.001
