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
    SealConfig,
    added,
    capabilities_json,
    capability_selection,
    head_columns,
    kv_rows,
    only_owned_trainable,
    read_capabilities,
    seal_random,
    sealed_off,
    strip_capabilities,
    widen,
)
from vllm_guard.secneuron.keys import load_public_key, load_signing_key, load_task_key
from vllm_guard.secneuron.lock import lock_checkpoint
from vllm_guard.secneuron.manifest import MANIFEST_NAME, Manifest, read_locked_manifest
from vllm_guard.secneuron.open import OpenReport
from vllm_guard.secneuron.options import SecNeuronLoadConfig
from vllm_guard.secneuron.preflight import open_data_keys
from vllm_guard.secneuron.rekey import revoke_task, rotate_task_key
from vllm_guard.secneuron.selection import Selection
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



def test_lock_refuses_sealed_columns_that_are_not_whole_heads(keydir, tmp_path):
    """One block, but half a head off: a public head would read sealed q/k/v rows."""
    model, caps, head_dim = _sealed(_public())
    plain = tmp_path / "plain"
    model.save_pretrained(plain, safe_serialization=True)
    selection = capability_selection(caps, head_dim)
    cols = selection.attn[0][TASK]
    selection.attn[0][TASK] = [c - head_dim // 2 for c in cols]
    with pytest.raises(ManifestError, match=f"not whole heads \\(head_dim {head_dim}\\)"):
        lock_checkpoint(plain, selection, {TASK: load_task_key(keydir / f"{TASK}.key")},
                        tmp_path / "locked", load_signing_key(keydir / "publisher.pem"),
                        progress=False)
    assert not (tmp_path / "locked").exists()


# --- grouped-query attention: g query heads share a KV head (query head h reads h // g) ---


def _public_gqa(arch: str):
    """4 heads on 2 KV heads (Llama, g = 2) or 6 on 2 (Qwen2, g = 3, nonzero q/k/v biases)."""
    torch.manual_seed(0)
    common = dict(intermediate_size=64, num_hidden_layers=2, num_key_value_heads=2,
                  vocab_size=40, max_position_embeddings=32, tie_word_embeddings=False)
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, num_attention_heads=4, head_dim=16, **common)).eval()
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=48, num_attention_heads=6, **common)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    return model


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gqa_widening_adds_whole_kv_groups_and_keeps_the_function(arch):
    public = _public_gqa(arch)
    heads, kv = public.config.num_attention_heads, public.config.num_key_value_heads
    group = heads // kv
    ref = _logits(public)
    wide, head_dim = widen(public, HEADS, NEURONS, 0.02, torch.Generator().manual_seed(1))
    wide.eval()
    own = added(public.config, wide.config)
    # HEADS = 2 <= g: one KV head and the g query heads that read it, appended last
    assert own.kv_heads == (kv,) and own.heads == tuple(range(heads, heads + group))
    assert (wide.config.num_attention_heads, wide.config.num_key_value_heads) == (
        heads + group, kv + 1)
    assert torch.allclose(_logits(wide), ref, atol=1e-5)
    attn = [layer.self_attn for layer in wide.model.layers]
    if arch == "qwen2":  # the biases came along; the new heads' are zero
        assert all(torch.all(a.k_proj.bias[kv_rows(own, head_dim)] == 0) for a in attn)
        assert all(torch.all(a.q_proj.bias[head_columns(own, head_dim)] == 0) for a in attn)
        assert all(torch.equal(a.k_proj.bias[:kv * head_dim], b.self_attn.k_proj.bias)
                   for a, b in zip(attn, public.model.layers, strict=True))
    with torch.no_grad():  # no public head reads the new KV heads
        for a in attn:
            for proj in (a.k_proj, a.v_proj):
                proj.weight[kv_rows(own, head_dim)] = torch.randn(head_dim, proj.in_features)
    assert torch.allclose(_logits(wide), ref, atol=1e-5)
    with torch.no_grad():  # the new query heads do read them, and sealed_off removes them
        for a in attn:
            cols = head_columns(own, head_dim)
            a.o_proj.weight[:, cols] = torch.randn(a.o_proj.out_features, len(cols))
    assert not torch.allclose(_logits(wide), ref, atol=1e-3)
    caps = {TASK: dict.fromkeys(range(2), own)}
    with sealed_off(wide, caps, [TASK], head_dim):
        assert torch.allclose(_logits(wide), ref, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gqa_training_changes_only_the_owned_entries(arch):
    public = _public_gqa(arch)
    model, head_dim = widen(public, HEADS, NEURONS, 0.02, torch.Generator().manual_seed(1))
    own = added(public.config, model.config)
    with torch.no_grad():  # as training left them: the output columns moved
        for layer in model.model.layers:
            cols = head_columns(own, head_dim)
            layer.self_attn.o_proj.weight[:, cols] = torch.randn(
                layer.self_attn.o_proj.out_features, len(cols))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(list(model.parameters()), lr=0.1)
    with only_owned_trainable(model, dict.fromkeys(range(2), own), head_dim):
        model.train()
        for _ in range(3):
            model(input_ids=IDS, labels=IDS).loss.backward()
            opt.step()
            opt.zero_grad()
    owned_idx = {"q_proj": head_columns(own, head_dim), "o_proj": head_columns(own, head_dim),
                 "k_proj": kv_rows(own, head_dim), "v_proj": kv_rows(own, head_dim),
                 "gate_proj": list(own.neurons), "up_proj": list(own.neurons),
                 "down_proj": list(own.neurons)}
    changed = set()
    for name, p in model.named_parameters():
        diff = p != before[name]
        if not diff.any():
            continue
        proj = name.rsplit(".", 2)[-2]
        assert name.endswith(".weight") and proj in owned_idx, name  # biases stay as they are
        owned = torch.zeros_like(diff)
        if proj in ("o_proj", "down_proj"):
            owned[:, owned_idx[proj]] = True
        else:
            owned[owned_idx[proj]] = True
        assert not (diff & ~owned).any(), f"{name} changed outside the owned entries"
        changed.add(proj)
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= changed


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def sealed_gqa(request, tmp_path_factory, random_tiny, keydir):
    """A GQA checkpoint sealed without training (seal_random), and it locked: Llama (the
    tiny fixture: 4 heads, 2 KV heads) or a Qwen2 with q/k/v biases."""
    root = tmp_path_factory.mktemp(f"gqa-{request.param}")
    base = random_tiny
    if request.param == "qwen2":
        base = root / "public"
        _public_gqa("qwen2").save_pretrained(base, safe_serialization=True)
        transformers.AutoTokenizer.from_pretrained(random_tiny).save_pretrained(base)
    plain = seal_random(base, TASK, SealConfig(heads=HEADS, neurons=NEURONS), root / "plain",
                        torch.Generator().manual_seed(3), out_std=0.5)
    locked = root / "locked"
    lock_checkpoint(plain, Selection.load(plain / "lock_selection.json"),
                    {TASK: load_task_key(keydir / f"{TASK}.key")}, locked,
                    load_signing_key(keydir / "publisher.pem"), chunk_bytes=512, progress=False)
    return base, plain, locked


def _load(d: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def test_gqa_lock_round_trip_with_and_without_the_key(sealed_gqa, keydir, tmp_path):
    base, plain, locked = sealed_gqa
    caps = read_capabilities(plain)
    own = caps[TASK][0]
    head_dim = _load(plain).config.head_dim
    assert own.kv_heads != own.heads and '"kv_heads"' in (plain / CAPABILITIES_NAME).read_text()
    manifest = read_locked_manifest(locked)
    (g,) = manifest.groups
    assert g.kv[0] == kv_rows(own, head_dim) and g.attn[0] == head_columns(own, head_dim)
    k = next(sl for sl in g.slices if sl.tensor.endswith("layers.0.self_attn.k_proj.weight"))
    assert g.span(k) == (own.kv_heads[0] * head_dim, len(own.kv_heads) * head_dim)
    ref, ciphertext = _weights(plain), _weights(locked)
    name = "model.layers.0.self_attn.k_proj.weight"
    rows = kv_rows(own, head_dim)
    assert not torch.equal(ciphertext[name][rows], ref[name][rows])  # the KV heads: encrypted
    assert torch.equal(ciphertext[name][:rows[0]], ref[name][:rows[0]])  # public: plaintext
    key, pub = load_task_key(keydir / f"{TASK}.key"), load_public_key(keydir / "publisher.pub")
    unlock_checkpoint(locked, {TASK: key}, tmp_path / "open", pub)
    opened = _weights(tmp_path / "open")
    assert all(torch.equal(opened[n], ref[n]) for n in ref)
    unlock_checkpoint(locked, {}, tmp_path / "none", pub)
    strip_capabilities(plain, [TASK], tmp_path / "stripped")
    got, want = _weights(tmp_path / "none"), _weights(tmp_path / "stripped")
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert torch.all(got[name][rows] == 0)
    public, sealed = _logits(_load(base)), _logits(_load(plain))
    assert not torch.allclose(sealed, public, atol=1e-3)  # the capability does something
    assert torch.allclose(_logits(_load(tmp_path / "none")), public, atol=1e-5)
    with ExitStack() as stack:  # the loader zeroes the same rows without the key
        streamed = dict(stream_weights(locked, manifest, {}, SecNeuronLoadConfig(),
                                       OpenReport([], [], [], 0, 0.0, {}), stack))
    assert all(torch.equal(streamed[n], want[n]) for n in want)
    placed = _open_in_place(locked, {})  # and so does the one-copy path
    assert all(torch.equal(placed[n], want[n]) for n in want)
    work = tmp_path / "rotated"  # rotation and revocation carry the KV rows
    import shutil

    from vllm_guard.secneuron.keys import TaskKey

    shutil.copytree(locked, work)
    new = TaskKey.generate(TASK)
    signer = load_signing_key(keydir / "publisher.pem")
    rotate_task_key(work, key, new, signer)
    newer = TaskKey.generate(TASK)
    revoke_task(work, TASK, {TASK: new}, signer, new_key=newer)  # re-encrypted: fresh data key
    unlock_checkpoint(work, {TASK: newer}, tmp_path / "reopened", pub)
    reopened = _weights(tmp_path / "reopened")
    assert all(torch.equal(reopened[n], ref[n]) for n in ref)


def test_gqa_lock_refuses_kv_rows_its_heads_do_not_read(sealed_gqa, keydir, tmp_path):
    _base, plain, _locked = sealed_gqa
    key = {TASK: load_task_key(keydir / f"{TASK}.key")}
    signer = load_signing_key(keydir / "publisher.pem")
    good = Selection.load(plain / "lock_selection.json")
    rows = good.kv[0][TASK]
    head_dim = len(rows) // len(read_capabilities(plain)[TASK][0].kv_heads)
    for kv, match in (([r - head_dim for r in rows], "not the KV heads"),  # a public KV head
                      (rows[:head_dim // 2] + rows[head_dim // 2 + 1:],
                       "not one block|not whole heads"),
                      (None, "outside|not the KV heads|not whole heads")):  # no kv: MHA
        selection = Selection.load(plain / "lock_selection.json")
        if kv is None:
            selection.kv = {}
        else:
            selection.kv[0][TASK] = kv
        with pytest.raises(ManifestError, match=match):
            lock_checkpoint(plain, selection, key, tmp_path / "locked", signer, progress=False)
        assert not (tmp_path / "locked").exists()


def test_gqa_manifest_with_a_moved_or_missing_kv_block_is_refused(sealed_gqa):
    import json

    _base, _plain, locked = sealed_gqa
    doc = json.loads((locked / MANIFEST_NAME).read_text())
    Manifest.from_json(doc)  # as signed: fine
    group = doc["body"]["groups"][0]
    rows = group["kv"]["1"]
    for edit in ({**group["kv"], "1": [r - len(rows) for r in rows]},  # another KV head
                 {"0": group["kv"]["0"]}):  # layer 1's kv block gone: read as its heads
        with pytest.raises(ManifestError, match="not the KV heads"):
            Manifest.from_json({**doc, "body": {**doc["body"], "groups": [
                {**group, "kv": edit}]}})


@pytest.mark.parametrize("sealed_gqa", ["qwen2"], indirect=True)
def test_lock_refuses_sealed_heads_with_a_nonzero_bias(sealed_gqa, keydir, tmp_path):
    import shutil

    from safetensors.torch import save_file

    _base, plain, _locked = sealed_gqa
    weights = _weights(plain)
    edited = tmp_path / "plain"
    shutil.copytree(plain, edited)
    for p in edited.glob("*.safetensors"):
        p.unlink()
    rows = Selection.load(plain / "lock_selection.json").kv[1][TASK]
    weights["model.layers.1.self_attn.k_proj.bias"][rows[0]] = 0.5  # trained: plaintext
    save_file(weights, str(edited / "model.safetensors"))
    with pytest.raises(ManifestError, match="bias"):
        lock_checkpoint(edited, Selection.load(edited / "lock_selection.json"),
                        {TASK: load_task_key(keydir / f"{TASK}.key")}, tmp_path / "locked",
                        load_signing_key(keydir / "publisher.pem"), progress=False)


def test_mha_capabilities_selection_and_manifest_carry_no_kv(locked_capability, tmp_path):
    """One KV head per head: the files are what they were before GQA, and files without
    KV heads (written before) read as one KV head per head."""
    plain, locked, caps, head_dim = locked_capability
    assert "kv_heads" not in capabilities_json(caps)
    assert "kv" not in capability_selection(caps, head_dim).to_json()
    assert all("kv" not in g.to_json() for g in read_locked_manifest(locked).groups)
    old = tmp_path / "old"
    old.mkdir()
    (old / CAPABILITIES_NAME).write_text(
        '{"tasks": {"reverse": {"0": {"heads": [2, 3], "neurons": [64, 65]}}}}')
    assert read_capabilities(old)[TASK][0].kv_heads == (2, 3)
    (old / "sel.json").write_text(
        '{"tasks": ["reverse"], "layers": {"0": {"reverse": [64]}}, '
        '"attn": {"0": {"reverse": [32, 33]}}}')
    assert Selection.load(old / "sel.json").kv == {}
