"""One copy: the loader reads each tensor straight into the parameter a plain-copy weight
loader would copy it into, hashes and decrypts it there; anything else falls back."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from vllm.config.load import LoadConfig

import vllm_guard.loader.secneuron_loader as adapter
from tests.unit.secneuron.test_capability import TASK as SEALED_TASK
from tests.unit.secneuron.test_capability import locked_capability  # noqa: F401
from tests.unit.secneuron.test_signed_checkpoint import (  # noqa: F401
    RecordingModel,
    copy,
    flip,
    locked,
    tensor_offset,
)
from tests.unit.secneuron.test_toolchain import TASKS
from vllm_guard.errors import DecryptionError
from vllm_guard.loader.placement import capture_placement
from vllm_guard.loader.secneuron_loader import SecNeuronModelLoader
from vllm_guard.runtime.grant_state import STATE as GRANT_STATE
from vllm_guard.secneuron.checkpoint import ffn_layers
from vllm_guard.secneuron.files import IntegrityError, digest_files
from vllm_guard.secneuron.keys import load_signing_key
from vllm_guard.secneuron.manifest import read_manifest, write_manifest


class CopyingModel(torch.nn.Module):
    """Like a vLLM model: parameters allocated first, gate and up merged into one, each
    checkpoint tensor copied into its place (vLLM's default and merged weight loaders)."""

    def __init__(self, shapes: dict[str, tuple[torch.dtype, list[int]]]):
        super().__init__()
        self.params = torch.nn.ParameterDict()
        self.where: dict[str, tuple[str, int]] = {}  # name -> (param key, row offset)
        layers = ffn_layers(list(shapes))
        merged = {info.gate: info for info in layers.values()}
        merged |= {info.up: info for info in layers.values()}
        for name, (dtype, shape) in shapes.items():
            if name in merged:
                info = merged[name]
                key = info.gate.replace(".", "_") + "_gate_up"
                if key not in self.params:
                    self.params[key] = torch.nn.Parameter(
                        torch.full([2 * shape[0], *shape[1:]], 7.0).to(dtype),
                        requires_grad=False)
                self.where[name] = (key, 0 if name == info.gate else shape[0])
            else:
                key = name.replace(".", "_")
                self.params[key] = torch.nn.Parameter(torch.full(shape, 7.0).to(dtype),
                                                      requires_grad=False)
                self.where[name] = (key, 0)

    def load_weights(self, weights) -> set[str]:
        done = set()
        for name, w in weights:
            key, row = self.where[name]
            self.params[key].data.narrow(0, row, w.shape[0]).copy_(w)
            done.add(f"params.{key}")  # vLLM returns the parameters it loaded
        return done

    def tensor(self, name: str, rows: int) -> torch.Tensor:
        key, row = self.where[name]
        return self.params[key].data.narrow(0, row, rows)


def shapes_of(model_dir: Path) -> dict[str, tuple[torch.dtype, list[int]]]:
    return {n: (t.dtype, list(t.shape)) for n, t in load_file(model_dir /
                                                             "model.safetensors").items()}


def load(model_dir: Path, keydir: Path, model: torch.nn.Module, **extra) -> None:
    config = {"keys": [str(keydir / f"{t}.key") for t in TASKS],
              "publisher_key": str(keydir / "publisher.pub"), **extra}
    loader = SecNeuronModelLoader(LoadConfig(load_format="secneuron",
                                             model_loader_extra_config=config))
    saved = dict(GRANT_STATE.task_bits)
    try:
        loader.load_weights(model, SimpleNamespace(model=str(model_dir)))
    finally:
        GRANT_STATE.task_bits = saved


@pytest.mark.parametrize("verify", [True, False])
def test_in_place_load_equals_the_stream(locked, keydir, verify):  # noqa: F811
    shapes = shapes_of(locked)
    plan = capture_placement(CopyingModel(shapes), [(n, d, s) for n, (d, s) in shapes.items()])
    assert plan.refused is None and set(plan.dest) == set(shapes)
    model = CopyingModel(shapes)
    load(locked, keydir, model, verify_weights=verify)
    stream = RecordingModel()  # computes with what it is given: the loader streams to it
    load(locked, keydir, stream, verify_weights=verify)
    assert stream.got.keys() == shapes.keys()
    for name, t in stream.got.items():
        got = model.tensor(name, t.shape[0])
        assert torch.equal(got.view(torch.uint8), t.view(torch.uint8)), name


def test_placement_refuses_anything_but_one_plain_copy(locked):  # noqa: F811
    shapes = shapes_of(locked)
    tensors = [(n, d, s) for n, (d, s) in shapes.items()]

    class Converting(CopyingModel):
        def load_weights(self, weights):
            return super().load_weights((n, w.float() * 1) for n, w in weights)

    class Twice(CopyingModel):
        def load_weights(self, weights):
            items = list(weights)
            return super().load_weights(items + items[:1])

    class Keeping(CopyingModel):
        def load_weights(self, weights):
            for n, w in weights:
                key, _ = self.where[n]
                if n.endswith("norm.weight"):
                    self.params[key] = torch.nn.Parameter(w, requires_grad=False)
            return set()

    class ScaledAfter(CopyingModel):
        def load_weights(self, weights):
            done = super().load_weights(weights)
            next(iter(self.params.values())).data.mul_(2)
            return done

    class Replaced(CopyingModel):
        def load_weights(self, weights):
            done = super().load_weights(weights)
            key = next(iter(self.params))
            self.params[key] = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
            return done

    class Padded(CopyingModel):  # vLLM's vocab embeddings zero their padding rows after
        def load_weights(self, weights):
            done = super().load_weights(weights)
            p = self.params["model_embed_tokens_weight"]
            extra = torch.nn.Parameter(torch.ones(p.shape[0] + 3, *p.shape[1:]).to(p.dtype),
                                       requires_grad=False)
            self.params["model_embed_tokens_weight"] = extra
            return done

    class Fills(CopyingModel):
        def __init__(self, shapes):
            super().__init__(shapes)
            p = self.params["model_embed_tokens_weight"]
            self.params["model_embed_tokens_weight"] = torch.nn.Parameter(
                torch.ones(p.shape[0] + 3, *p.shape[1:]).to(p.dtype), requires_grad=False)

        def load_weights(self, weights):
            done = super().load_weights(weights)
            self.params["model_embed_tokens_weight"].data[-3:].fill_(0)
            return done

    plan = capture_placement(Fills(shapes), tensors)
    assert plan.refused is None, plan.refused  # other bytes of the same parameter
    for cls, why in ((Padded, "no longer holds"), (Converting, "computes with it"),
                     (Twice, "copied twice"),
                     (Keeping, "keeps the tensor itself"), (RecordingModel, "computes"),
                     (ScaledAfter, "changes it after copying"),
                     (Replaced, "no longer holds the memory")):
        model = cls(shapes) if cls is not RecordingModel else cls()
        plan = capture_placement(model, tensors)
        assert plan.refused and why in plan.refused, (cls, plan.refused)
    model = CopyingModel(shapes)
    before = {k: p.clone() for k, p in model.params.items()}
    capture_placement(model, tensors)  # writes nothing
    assert all(torch.equal(before[k], p) for k, p in model.params.items())


def test_tampered_block_refused_before_use_in_place(locked, keydir, tmp_path):  # noqa: F811
    """A flipped byte anywhere in a shard fails its block's BLAKE3; one the publisher signed
    fails its AEAD tag. Either way load_weights raises: the model is never served."""
    bad = copy(locked, tmp_path / "bad")
    weights = bad / "model.safetensors"
    flip(weights, tensor_offset(weights, "model.embed_tokens.weight", 3))
    with pytest.raises(IntegrityError, match="block 0 of .*modified after signing"):
        load(bad, keydir, CopyingModel(shapes_of(locked)))
    bad2 = copy(locked, tmp_path / "bad2")
    manifest = read_manifest(bad2)
    g = manifest.groups[0]
    sl = next(s for s in g.slices if s.axis == 0)
    weights = bad2 / "model.safetensors"
    flip(weights, tensor_offset(weights, sl.tensor, g.neurons[sl.layer][0] * sl.shape[1]))
    manifest.files["model.safetensors"] = digest_files(bad2, ["model.safetensors"])[
        "model.safetensors"]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == \
        manifest.files["model.safetensors"].sha256
    manifest.sign(load_signing_key(keydir / "publisher.pem"))
    write_manifest(manifest, bad2)
    with pytest.raises(DecryptionError, match=f"tensor {sl.tensor}, group {g.id}, chunk 0"):
        load(bad2, keydir, CopyingModel(shapes_of(locked)))


def test_sealed_capability_loads_in_place_without_its_key(locked_capability, keydir,  # noqa: F811
                                                          monkeypatch):
    """Sealed capability (#35), one-copy path: without the task's key the heads and neurons it
    placed are zero; with it they are the trained ones (masked per request: kernels.layer)."""
    _plain, sealed, _caps, _ = locked_capability

    def no_stream(*_a, **_k):
        raise AssertionError("fell back to the stream: the one-copy path was not taken")

    monkeypatch.setattr(adapter, "stream_weights", no_stream)

    def load_sealed(keys: list[str]) -> CopyingModel:
        model = CopyingModel(shapes_of(sealed))
        loader = SecNeuronModelLoader(LoadConfig(load_format="secneuron",
                                                 model_loader_extra_config={
                                                     "keys": keys, "publisher_key":
                                                     str(keydir / "publisher.pub")}))
        saved = dict(GRANT_STATE.task_bits)
        try:
            loader.load_weights(model, SimpleNamespace(model=str(sealed)))
        finally:
            GRANT_STATE.task_bits = saved
        return model

    model = load_sealed([])
    o = model.tensor("model.layers.0.self_attn.o_proj.weight", 32)
    assert torch.all(o[:, 32:] == 0) and o[:, :32].abs().sum() > 0
    assert torch.all(model.tensor("model.layers.0.self_attn.v_proj.weight", 64)[32:] == 0)
    down = model.tensor("model.layers.1.mlp.down_proj.weight", 32)
    assert torch.all(down[:, 64:] == 0) and down[:, :64].abs().sum() > 0
    opened = load_sealed([str(keydir / f"{SEALED_TASK}.key")])  # heads as trained
    plain = load_file(_plain / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(opened.tensor(name, 32), plain[name])
