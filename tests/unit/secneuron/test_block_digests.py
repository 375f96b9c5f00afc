"""Per-block signed digests: tensors stream as soon as their blocks verify, never before;
and the ciphertext layout of a group does not depend on the groups gathered beside it."""

from __future__ import annotations

import hashlib
from concurrent.futures import Future
from dataclasses import replace

import blake3
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vllm_guard.secneuron.checkpoint import block_bytes, gather_neurons, safetensors_layout
from vllm_guard.secneuron.files import IntegrityError, digest_files
from vllm_guard.secneuron.verify import VerifiedFile, iter_verified_tensors

BLOCK = 4096


@pytest.fixture
def shard(tmp_path):
    tensors = {f"t{i:02d}": torch.full((512,), float(i)) for i in range(16)}  # 2 KiB each
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path, tensors


def test_block_digests_match_an_independent_hash(shard):
    root, _ = shard
    data = (root / "model.safetensors").read_bytes()
    d = digest_files(root, ["model.safetensors"], block_bytes=BLOCK)["model.safetensors"]
    assert d.sha256 == hashlib.sha256(data).hexdigest() and d.size == len(data)
    assert list(d.blocks) == [blake3.blake3(data[i:i + BLOCK]).hexdigest()  # format 5
                              for i in range(0, len(data), BLOCK)]
    assert len(d.blocks) > 4


def test_tensors_stream_before_the_end_but_never_past_a_bad_block(shard):
    root, tensors = shard
    expected = digest_files(root, ["model.safetensors"], block_bytes=BLOCK)
    path = root / "model.safetensors"
    entries, _ = safetensors_layout(torch.from_numpy(np.fromfile(path, dtype=np.uint8)), path)
    bad = entries[-3].start + 5  # a byte inside the third-last tensor
    raw = bytearray(path.read_bytes())
    raw[bad] ^= 1
    path.write_bytes(bytes(raw))
    got = []
    with pytest.raises(IntegrityError, match=f"block {bad // BLOCK} of"):
        for _, name, t in iter_verified_tensors(root, expected, workers=2):
            got.append(name)
            assert torch.equal(t, tensors[name])
    ends = {e.name: e.end for e in entries}
    assert got, "nothing streamed before the bad block"  # pipelined, not whole-file
    assert all(ends[n] <= bad // BLOCK * BLOCK for n in got)  # never a byte of the bad block


def test_a_tampered_block_is_refused_by_its_blake3_digest(shard):
    """The loader checks blocks by BLAKE3: a flipped byte fails its block's BLAKE3 before any
    byte of that block is handed out, and SHA-256 block digests (format 4's) of the very same
    untouched bytes do not pass for BLAKE3 ones."""
    root, tensors = shard
    path = root / "model.safetensors"
    good = digest_files(root, ["model.safetensors"], block_bytes=BLOCK)
    data = path.read_bytes()
    sha_blocks = tuple(hashlib.sha256(data[i:i + BLOCK]).hexdigest()
                       for i in range(0, len(data), BLOCK))
    as_v4 = {"model.safetensors": replace(good["model.safetensors"], blocks=sha_blocks)}
    with pytest.raises(IntegrityError, match="block 0 of .*: blake3 "):
        next(iter_verified_tensors(root, as_v4, workers=2))

    raw = bytearray(data)
    entries, _ = safetensors_layout(torch.from_numpy(np.frombuffer(raw, dtype=np.uint8)), path)
    bad = entries[len(entries) // 2].start + 3
    raw[bad] ^= 0x80
    path.write_bytes(bytes(raw))
    got = []
    with pytest.raises(IntegrityError, match=f"block {bad // BLOCK} of .*: blake3 [0-9a-f]{{16}}"
                                             r"\.\.\., signed "):
        for _, name, t in iter_verified_tensors(root, good, workers=2):
            got.append(name)
            assert torch.equal(t, tensors[name])
    ends = {e.name: e.end for e in entries}
    assert all(ends[n] <= bad // BLOCK * BLOCK for n in got)  # no byte of the bad block


class _InlinePool:
    """An executor whose work runs inside submit(): the fastest a pool thread can be."""

    def submit(self, fn, *args):
        f: Future = Future()
        try:
            f.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - delivered through the future
            f.set_exception(e)
        return f


def test_a_block_checked_before_the_constructor_returns_reports_integrity(shard):
    # CI race: a pool thread checked block 0 before VerifiedFile had finished __init__
    root, _ = shard
    expected = digest_files(root, ["model.safetensors"], block_bytes=BLOCK)["model.safetensors"]
    path = root / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[10] ^= 1
    path.write_bytes(bytes(raw))
    vf = VerifiedFile(root, "model.safetensors", expected, _InlinePool())
    with pytest.raises(IntegrityError, match="block 0 of"):
        vf.wait(1)


def test_verified_stream_yields_every_tensor_exactly(shard):
    root, tensors = shard
    expected = digest_files(root, ["model.safetensors"], block_bytes=BLOCK)
    got = {name: t.clone() for _, name, t in iter_verified_tensors(root, expected)}
    assert got.keys() == tensors.keys()
    assert all(torch.equal(got[n], tensors[n]) for n in got)


@pytest.mark.parametrize("axis", [0, 1])
def test_block_bytes_are_the_blocks_ciphertext_layout_in_place(axis):
    """A block of consecutive neurons: the same bytes, in the same order, as gathering them,
    and writes land in the tensor itself, on those neurons only."""
    t = torch.randn(24, 40).to(torch.bfloat16) if axis else torch.randn(40, 24)
    block = block_bytes(t, axis, 5, 7)
    _, alone = gather_neurons(t, axis, torch.arange(5, 12))
    assert block.tobytes() == alone.tobytes()
    before = t.clone()
    block[...] ^= 0xFF
    changed = (t.view(torch.int16 if axis else torch.int32) !=
               before.view(torch.int16 if axis else torch.int32))
    assert changed.any(dim=1 - axis).nonzero().flatten().tolist() == list(range(5, 12))
