"""The ciphertext detector on sealed heads (#35): their q/k/v rows and o_proj columns have no
gate/up/down triple, so they are scanned as blocks of vectors of their own."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import vllm_guard.secneuron.weights as weights
from tests.unit.secneuron.test_capability import locked_capability  # noqa: F401
from vllm_guard.errors import EncryptedWeightsError
from vllm_guard.secneuron.detector import scan_block
from vllm_guard.secneuron.manifest import is_attention, read_locked_manifest
from vllm_guard.secneuron.open import OpenReport
from vllm_guard.secneuron.options import SecNeuronLoadConfig


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scan_block_flags_ciphertext_vectors_only(dtype):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(16, 64, generator=gen) * 0.05).to(dtype)
    w[3, 5] = 30.0  # one outlier weight never flags a vector
    assert scan_block(w, 0, list(range(16))) == 0 and scan_block(w, 1, list(range(64))) == 0
    noise = torch.randint(-2**15, 2**15, (4, 64), generator=gen, dtype=torch.int32)
    w[8:12] = noise.to(torch.int16).view(dtype)[:, :64] if dtype != torch.float32 \
        else noise.view(torch.float32)
    assert scan_block(w, 0, list(range(8, 12))) == 4
    assert scan_block(w, 0, list(range(12, 16))) == 0 and scan_block(w, 0, []) == 0


def test_heads_left_encrypted_are_refused_before_use(locked_capability, monkeypatch):  # noqa: F811
    """Decryption that left a sealed head's rows as ciphertext (simulated: decryption skipped,
    the FFN blocks zeroed so only the heads hold ciphertext) is refused."""
    _plain, locked, _caps, _ = locked_capability
    manifest = read_locked_manifest(locked)
    tensors = load_file(locked / "model.safetensors")
    names = weights.layer_tensors(manifest)[0]
    layer = {n: tensors[n].clone() for n in names}
    for g in manifest.groups:
        for sl in g.slices:
            if sl.layer == 0 and not is_attention(sl.tensor):
                start, count = g.span(sl)
                layer[sl.tensor].narrow(sl.axis, start, count).zero_()
    monkeypatch.setattr(weights, "decrypt_in_place",
                        lambda *_a, **_k: OpenReport([], [], [], 0, 0.0, {}))
    with pytest.raises(EncryptedWeightsError, match="sealed head vectors of .*self_attn"):
        weights._open_layer(0, layer, manifest, {}, SecNeuronLoadConfig())
