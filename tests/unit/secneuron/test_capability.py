"""Sealed capabilities (vllm_guard/secneuron/capability.py): a task in heads and neurons of its
own, on public weights that never learnt it, locked and opened like any other lock."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from vllm_guard.errors import ManifestError
from vllm_guard.secneuron.capability import (
    CAPABILITIES_NAME,
    Owned,
    capabilities_json,
    capability_selection,
    head_columns,
    only_owned_trainable,
    sealed_off,
    strip_capabilities,
    widen,
)
from vllm_guard.secneuron.keys import load_public_key, load_signing_key, load_task_key
from vllm_guard.secneuron.lock import lock_checkpoint
from vllm_guard.secneuron.manifest import read_locked_manifest
from vllm_guard.secneuron.open import OpenReport
from vllm_guard.secneuron.options import SecNeuronLoadConfig
from vllm_guard.secneuron.preflight import open_data_keys
from vllm_guard.secneuron.rekey import revoke_task, rotate_task_key
from vllm_guard.secneuron.unlock import unlock_checkpoint
from vllm_guard.secneuron.weights import (
    layer_tensors,
    load_in_place,
    open_shards,
    stream_weights,
)

TASK = "reverse"
HEADS, NEURONS = 2, 8


def _public() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                   vocab_size=40, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def _sealed(public) -> tuple[transformers.LlamaForCausalLM, dict[str, dict[int, Owned]], int]:
    """The public model widened for TASK, its own entries set as training would."""
    model, head_dim = widen(public, HEADS, NEURONS, 0.02, torch.Generator().manual_seed(1))
    owned = {i: Owned((2, 3), tuple(range(64, 64 + NEURONS))) for i in range(2)}
    with torch.no_grad():
        for i, o in owned.items():
            attn, mlp = model.model.layers[i].self_attn, model.model.layers[i].mlp
            cols = head_columns(o, head_dim)
            attn.o_proj.weight[:, cols] = torch.randn(32, len(cols))
            mlp.down_proj.weight[:, list(o.neurons)] = torch.randn(32, NEURONS)
    return model.eval(), {TASK: owned}, head_dim


IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4]])


def test_widened_model_without_its_own_entries_is_the_public_model():
    public = _public()
    with torch.no_grad():
        ref = public(input_ids=IDS).logits
        wide, _ = widen(public, HEADS, NEURONS, 0.02, torch.Generator().manual_seed(1))
        assert torch.allclose(wide.eval()(input_ids=IDS).logits, ref, atol=1e-5)
        model, caps, head_dim = _sealed(public)
        assert not torch.allclose(model(input_ids=IDS).logits, ref, atol=1e-3)
        with sealed_off(model, caps, [TASK], head_dim):
            assert torch.allclose(model(input_ids=IDS).logits, ref, atol=1e-5)


def test_training_changes_only_the_owned_entries():
    model, caps, head_dim = _sealed(_public())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters()], lr=0.1)
    with only_owned_trainable(model, caps[TASK], head_dim):
        model.train()
        for _ in range(3):
            model(input_ids=IDS, labels=IDS).loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    changed = 0
    for name, p in model.named_parameters():
        diff = (p != before[name])
        if diff.any():
            changed += 1
            proj = name.rsplit(".", 2)[-2]
            assert proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"), name
            owned = torch.zeros_like(diff)
            cols, neurons = head_columns(caps[TASK][0], head_dim), list(caps[TASK][0].neurons)
            idx = cols if proj.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else neurons
            if proj in ("o_proj", "down_proj"):
                owned[:, idx] = True
            else:
                owned[idx] = True
            assert not (diff & ~owned).any(), f"{name} changed outside the owned entries"
    assert changed


@pytest.fixture(scope="module")
def locked_capability(tmp_path_factory, keydir):
    root = tmp_path_factory.mktemp("capability")
    model, caps, head_dim = _sealed(_public())
    plain = root / "plain"
    model.save_pretrained(plain, safe_serialization=True)
    (plain / CAPABILITIES_NAME).write_text(capabilities_json(caps))
    out = root / "locked"
    keys = {TASK: load_task_key(keydir / f"{TASK}.key")}
    lock_checkpoint(plain, capability_selection(caps, head_dim), keys, out,
                    load_signing_key(keydir / "publisher.pem"), chunk_bytes=512, progress=False)
    return plain, out, caps, head_dim


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return {k: v for p in sorted(d.glob("*.safetensors")) for k, v in load_file(p).items()}


def test_lock_encrypts_heads_and_neurons_and_the_key_opens_them(locked_capability, keydir,
                                                                tmp_path):
    plain, locked, _caps, _ = locked_capability
    manifest = read_locked_manifest(locked)
    sealed = {sl.tensor.rsplit(".", 2)[-2] for g in manifest.groups for sl in g.slices}
    assert sealed == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                      "down_proj"}
    ciphertext = _weights(locked)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ciphertext[q][32:], _weights(plain)[q][32:])  # the heads: encrypted
    assert torch.equal(ciphertext[q][:32], _weights(plain)[q][:32])  # public heads: plaintext
    unlock_checkpoint(locked, {TASK: load_task_key(keydir / f"{TASK}.key")}, tmp_path / "open",
                      load_public_key(keydir / "publisher.pub"))
    opened, ref = _weights(tmp_path / "open"), _weights(plain)
    assert all(torch.equal(opened[k], ref[k]) for k in ref)


def test_without_the_key_the_capability_is_exactly_zeroed(locked_capability, keydir, tmp_path):
    plain, locked, _caps, _ = locked_capability
    other = {"add": load_task_key(keydir / "add.key")}
    with pytest.raises(Exception, match="add"):  # a key for no task of this checkpoint
        unlock_checkpoint(locked, other, tmp_path / "x", load_public_key(keydir / "publisher.pub"))
    unlock_checkpoint(locked, {}, tmp_path / "none", load_public_key(keydir / "publisher.pub"))
    strip_capabilities(plain, [TASK], tmp_path / "stripped")
    got, want = _weights(tmp_path / "none"), _weights(tmp_path / "stripped")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_rotate_and_revoke_cover_the_heads(locked_capability, keydir, tmp_path):
    import shutil

    from vllm_guard.secneuron.keys import TaskKey

    _plain, locked, _caps, _ = locked_capability
    work = tmp_path / "ckpt"
    shutil.copytree(locked, work)
    old = load_task_key(keydir / f"{TASK}.key")
    new = TaskKey.generate(TASK)
    signer = load_signing_key(keydir / "publisher.pem")
    rotate_task_key(work, old, new, signer)
    unlock_checkpoint(work, {TASK: new}, tmp_path / "rotated", load_public_key(
        keydir / "publisher.pub"))
    revoke_task(work, TASK, {TASK: new}, signer)  # no new key: the capability is gone
    unlock_checkpoint(work, {}, tmp_path / "revoked", load_public_key(keydir / "publisher.pub"))
    rotated, revoked = _weights(tmp_path / "rotated"), _weights(tmp_path / "revoked")
    o = "model.layers.1.self_attn.o_proj.weight"
    assert rotated[o][:, 32:].abs().sum() > 0 and torch.all(revoked[o][:, 32:] == 0)


def test_loader_holds_attention_until_opened_and_opens_it_with_the_key(
        locked_capability, keydir):
    plain, locked, _caps, _ = locked_capability
    manifest = read_locked_manifest(locked)
    assert "model.layers.0.self_attn.o_proj.weight" in layer_tensors(manifest)[0]
    data_keys = open_data_keys(manifest, {TASK: load_task_key(keydir / f"{TASK}.key")})
    stats = OpenReport([], [], [], 0, 0.0, {})
    with ExitStack() as stack:  # with the key: the heads as trained (served per request)
        opened = dict(stream_weights(locked, manifest, data_keys, SecNeuronLoadConfig(), stats,
                                     stack))
    original = _weights(plain)
    for p in ("q", "k", "v", "o"):
        name = f"model.layers.0.self_attn.{p}_proj.weight"
        assert torch.equal(opened[name], original[name])
    with ExitStack() as stack:  # without the key: zeroed heads, the public model
        weights = dict(stream_weights(locked, manifest, {}, SecNeuronLoadConfig(), stats,
                                      stack))
    assert torch.all(weights["model.layers.0.self_attn.q_proj.weight"][32:] == 0)


def _open_in_place(locked: Path, data_keys: dict[str, bytes],
                   config: SecNeuronLoadConfig | None = None) -> dict[str, torch.Tensor]:
    """The one-copy path: every tensor read into memory of its own, opened there."""
    manifest = read_locked_manifest(locked)
    shards = open_shards(locked, manifest)
    try:
        dest = {e.name: torch.full(e.shape, 7.0).to(e.dtype) for s in shards for e in s.entries}
        load_in_place(shards, manifest, data_keys, config or SecNeuronLoadConfig(),
                      OpenReport([], [], [], 0, 0.0, {}), dest)
    finally:
        for s in shards:
            s.close()
    return dest


@pytest.mark.parametrize("verify", [True, False])
def test_one_copy_path_zeroes_the_heads_and_opens_them_with_the_key(locked_capability, keydir,
                                                                 verify):
    _plain, locked, _caps, _ = locked_capability
    manifest = read_locked_manifest(locked)
    config = SecNeuronLoadConfig(verify_weights=verify)
    with ExitStack() as stack:  # the stream (verified, or mapped without hashing)
        streamed = dict(stream_weights(locked, manifest, {}, config,
                                       OpenReport([], [], [], 0, 0.0, {}), stack))
    placed = _open_in_place(locked, {}, config)
    assert streamed.keys() == placed.keys()
    assert all(torch.equal(placed[k], streamed[k]) for k in streamed)
    assert torch.all(placed["model.layers.1.self_attn.o_proj.weight"][:, 32:] == 0)
    assert placed["model.layers.1.self_attn.o_proj.weight"][:, :32].abs().sum() > 0
    data_keys = open_data_keys(manifest, {TASK: load_task_key(keydir / f"{TASK}.key")})
    opened = _open_in_place(locked, data_keys, config)
    original = _weights(_plain)
    o = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(opened[o], original[o]) and opened[o][:, 32:].abs().sum() > 0


def test_scattered_neurons_are_permuted_into_a_block_beside_the_heads(keydir, tmp_path):
    """Format 6 with a sealed capability: its FFN neurons become one block (signed
    permutation), its heads stay where they are; unlock gives the plaintext back with the
    key and exactly the capability-less model without it."""
    model, caps, head_dim = _sealed(_public())
    owned = {i: Owned((2, 3), (5, 17, *range(64, 64 + NEURONS - 2))) for i in range(2)}
    caps = {TASK: owned}
    plain = tmp_path / "plain"
    model.save_pretrained(plain, safe_serialization=True)
    (plain / CAPABILITIES_NAME).write_text(capabilities_json(caps))
    locked = tmp_path / "locked"
    key = load_task_key(keydir / f"{TASK}.key")
    lock_checkpoint(plain, capability_selection(caps, head_dim), {TASK: key}, locked,
                    load_signing_key(keydir / "publisher.pem"), chunk_bytes=512, progress=False)
    manifest = read_locked_manifest(locked)
    (g,) = manifest.groups
    assert g.selected[0] == [5, 17, *range(64, 70)] and g.neurons[0] == list(range(5, 13))
    assert g.attn[0] == list(range(32, 64))
    pub = load_public_key(keydir / "publisher.pub")
    unlock_checkpoint(locked, {TASK: key}, tmp_path / "open", pub)
    opened, ref = _weights(tmp_path / "open"), _weights(plain)
    assert all(torch.equal(opened[k], ref[k]) for k in ref)
    unlock_checkpoint(locked, {}, tmp_path / "none", pub)
    strip_capabilities(plain, [TASK], tmp_path / "stripped")
    got, want = _weights(tmp_path / "none"), _weights(tmp_path / "stripped")
    assert all(torch.equal(got[k], want[k]) for k in want)
    placed = _open_in_place(locked, {})
    down = placed["model.layers.0.mlp.down_proj.weight"]
    assert torch.all(down[:, 5:13] == 0) and torch.all(down[:, :5] != 0)


def test_lock_refuses_heads_that_are_not_one_block(keydir, tmp_path):
    model, caps, head_dim = _sealed(_public())
    plain = tmp_path / "plain"
    model.save_pretrained(plain, safe_serialization=True)
    selection = capability_selection(caps, head_dim)
    selection.attn[0][TASK] = [*range(0, 16), *range(32, 48)]  # heads 0 and 2: not adjacent
    with pytest.raises(ManifestError, match="not one block"):
        lock_checkpoint(plain, selection, {TASK: load_task_key(keydir / f"{TASK}.key")},
                        tmp_path / "locked", load_signing_key(keydir / "publisher.pem"),
                        progress=False)
    assert not (tmp_path / "locked").exists()

