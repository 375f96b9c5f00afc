"""Format 6: each group's neurons are one block of a layer (a signed permutation of the FFN
neurons), decrypted where they lie."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from safetensors.torch import load_file

from harness.fixtures import PRESETS, build_fixture
from tests.unit.secneuron.test_toolchain import TASKS, synthetic_selection
from vllm_guard.errors import DecryptionError, ManifestError
from vllm_guard.secneuron.checkpoint import (
    block_bytes,
    gather_neurons,
    load_checkpoint,
    slice_tensors,
)
from vllm_guard.secneuron.crypto import (
    chunk_aad,
    decrypt_chunk_in_place,
    decrypt_chunks_in_place,
    encrypt_in_place,
)
from vllm_guard.secneuron.keys import TaskKey
from vllm_guard.secneuron.lock import lock_checkpoint
from vllm_guard.secneuron.manifest import (
    MANIFEST_NAME,
    Manifest,
    layer_permutation,
    plan_blocks,
    read_manifest,
)
from vllm_guard.secneuron.neuron_bits import neuron_bits
from vllm_guard.secneuron.open import decrypt_in_place
from vllm_guard.secneuron.preflight import open_data_keys
from vllm_guard.secneuron.unlock import unlock_checkpoint


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    """(plain dir, locked dir, task keys): scattered, overlapping picks, unsigned."""
    root = tmp_path_factory.mktemp("layout")
    preset = replace(PRESETS["tiny"], train_steps=0, dtype="float32")
    plain = build_fixture(root / "plain", preset, seed=5)
    keys = {t: TaskKey.generate(t) for t in TASKS}
    selection = synthetic_selection(preset.num_hidden_layers, preset.intermediate_size, seed=2)
    lock_checkpoint(plain, selection, keys, root / "locked", None, chunk_bytes=4096,
                    progress=False)
    return plain, root / "locked", keys


def test_plan_blocks_disjoint_and_keeps_contiguous_groups():
    assert plan_blocks(16, [[2, 3, 4], [8, 9]]) == [2, 8]  # already blocks: identity
    rng = np.random.default_rng(0)
    for _ in range(50):
        size = int(rng.integers(8, 64))
        picks = rng.permutation(size)[:int(rng.integers(1, size))]
        groups = [sorted(p.tolist()) for p in np.array_split(picks, int(rng.integers(1, 5)))]
        starts = plan_blocks(size, groups)
        blocks = [(list(range(s, s + len(g))), g) for s, g in zip(starts, groups, strict=True)
                  if g]
        covered = [p for pos, _ in blocks for p in pos]
        assert len(set(covered)) == len(covered) and all(0 <= p < size for p in covered)
        perm = layer_permutation(size, blocks)
        assert sorted(perm.tolist()) == list(range(size))  # a permutation
        for pos, g in blocks:
            assert perm[pos].tolist() == g


def test_permuted_checkpoint_computes_the_same_function(locked):
    plain, out, keys = locked
    manifest = read_manifest(out)
    ckpt = load_checkpoint(out)
    decrypt_in_place(ckpt.tensors, manifest, open_data_keys(manifest, keys))
    orig = load_file(plain / "model.safetensors")
    moved = 0
    x = torch.randn(5, orig["model.embed_tokens.weight"].shape[1], dtype=torch.float64)
    for layer, info in manifest.layers.items():
        perm = torch.from_numpy(manifest.permutation(layer))
        moved += int((perm != torch.arange(len(perm))).sum())
        gate, up, down = (ckpt.tensors[n] for n, _ in slice_tensors(info))
        # the served layer holds the plaintext neurons, only in another order ...
        assert torch.equal(gate, orig[info.gate][perm])
        assert torch.equal(up, orig[info.up][perm])
        assert torch.equal(down, orig[info.down][:, perm])

        # ... so the MLP computes the same function
        def mlp(g, u, d):
            return F.linear(F.silu(F.linear(x, g.double())) * F.linear(x, u.double()),
                            d.double())
        assert torch.allclose(mlp(gate, up, down),
                              mlp(orig[info.gate], orig[info.up], orig[info.down]),
                              rtol=1e-9, atol=1e-12)
    assert moved  # the scattered picks really were permuted
    # unlock with every key gives back the plaintext checkpoint, byte for byte
    unlock_checkpoint(out, keys, out.parent / "unlocked", allow_unsigned=True)
    back = load_file(out.parent / "unlocked" / "model.safetensors")
    assert back.keys() == orig.keys()
    assert all(torch.equal(back[k].view(torch.uint8), orig[k].view(torch.uint8)) for k in orig)


def test_in_place_decrypt_writes_exactly_the_groups_block(locked):
    _, out, keys = locked
    manifest = read_manifest(out)
    ckpt = load_checkpoint(out)
    before = {n: t.clone() for n, t in ckpt.tensors.items()}
    target = next(g for g in manifest.groups if len(g.policy) == 1)
    data_keys = {target.id: open_data_keys(manifest, keys)[target.id]}
    rep = decrypt_in_place(ckpt.tensors, manifest, data_keys, zero_locked=False)
    assert rep.bytes_decrypted == sum(c.length for sl in target.slices for c in sl.chunks)
    for name, t in ckpt.tensors.items():
        diff = t.view(torch.uint8) != before[name].view(torch.uint8)
        sl = next((s for s in target.slices if s.tensor == name), None)
        if sl is None:
            assert not diff.any(), name
            continue
        start, count = target.block(sl.layer)
        es = t.element_size()
        along = diff.any(dim=1) if sl.axis == 0 else diff.view(diff.shape[0], -1, es).any(
            dim=2).any(dim=0)
        changed = along.nonzero().flatten().tolist()
        assert changed and set(changed) <= set(range(start, start + count)), name


def test_down_block_tamper_refused_by_its_tag(locked):
    """down_proj blocks are strided (staged chunk by chunk): a flipped byte in one still
    fails that chunk's tag, named."""
    _, out, keys = locked
    manifest = read_manifest(out)
    ckpt = load_checkpoint(out)
    g = manifest.groups[0]
    sl = next(s for s in g.slices if s.axis == 1 and len(s.chunks) >= 2)
    block = block_bytes(ckpt.tensors[sl.tensor], 1, *g.block(sl.layer))
    assert not block.flags.c_contiguous
    r, c = divmod(sl.chunks[0].length + 3, block.shape[1])  # byte 3 of chunk 1, row-major
    block[r, c] ^= 1
    with pytest.raises(DecryptionError, match=f"tensor {sl.tensor}, group {g.id}, chunk 1: "
                       "authentication failed"):
        decrypt_in_place(ckpt.tensors, manifest, open_data_keys(manifest, keys), workers=1)


def test_strided_encryption_is_the_gathered_ciphertext():
    """Encrypting a down_proj block where it lies equals the AEAD of its bytes row-major."""
    t = torch.randn(12, 40).to(torch.bfloat16)
    plain = t.clone()
    key = os.urandom(32)
    block = block_bytes(t, 1, 7, 9)
    assert not block.flags.c_contiguous
    chunks = encrypt_in_place(key, block, {"b": 1}, 50)  # chunks cut rows mid-way
    _, flat = gather_neurons(t, 1, torch.arange(7, 16))
    view, off = memoryview(flat), 0
    for i, c in enumerate(chunks):
        decrypt_chunk_in_place(AESGCM(key), view[off:off + c.length], c,
                               chunk_aad({"b": 1}, i, len(chunks)), "ref")
        off += c.length
    assert flat.tobytes() == gather_neurons(plain, 1, torch.arange(7, 16))[1].tobytes()
    assert not torch.equal(t, plain)  # encrypted in t itself ...
    decrypt_chunks_in_place(key, block, chunks, {"b": 1}, "t")
    assert torch.equal(t.view(torch.int16), plain.view(torch.int16))  # ... and back


def test_neuron_bits_index_the_locked_positions(locked):
    _, out, _ = locked
    manifest = read_manifest(out)
    bits = neuron_bits(manifest)
    for layer in manifest.layers:
        want = torch.full_like(bits[layer], -1)
        for g in manifest.groups:
            if layer in g.neurons:
                start, count = g.block(layer)
                want[start:start + count] = manifest.task_bits(g.policy)
        assert torch.equal(bits[layer], want)


def _edited(out: Path, tmp: Path, edit) -> Path:
    doc = json.loads((out / MANIFEST_NAME).read_text())
    edit(doc["body"])
    p = tmp / MANIFEST_NAME
    p.write_text(json.dumps(doc))
    return tmp


def test_bad_layouts_and_format_5_are_refused(locked, tmp_path):
    _, out, _ = locked

    def overlap(body):
        a, b = body["groups"][0], body["groups"][1]
        layer = next(k for k in a["neurons"] if k in b["neurons"])
        b["neurons"][layer] = list(range(a["neurons"][layer][0],
                                         a["neurons"][layer][0] + len(b["neurons"][layer])))

    def scattered(body):
        g = body["groups"][0]
        layer = next(iter(g["neurons"]))
        g["neurons"][layer][-1] += 1000

    def twice(body):
        g = body["groups"][0]
        layer = next(iter(g["selected"]))
        g["selected"][layer][1] = g["selected"][layer][0]

    for edit, match in ((overlap, "overlap another group's"), (scattered, "not one block"),
                        (twice, "selected twice|overlap")):
        d = tmp_path / edit.__name__
        d.mkdir()
        with pytest.raises(ManifestError, match=match):
            read_manifest(_edited(out, d, edit))

    def old(body):
        body["format_version"] = 5

    d = tmp_path / "v5"
    d.mkdir()
    with pytest.raises(ManifestError, match=r"^manifest format 5 .* lock the checkpoint again$"):
        read_manifest(_edited(out, d, old))
    assert isinstance(read_manifest(out), Manifest)
