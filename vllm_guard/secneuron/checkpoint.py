"""Safetensors checkpoint I/O and the FFN-neuron view of a Llama/Qwen2/Mistral model.

A neuron ``n`` of layer ``l`` is row ``n`` of ``gate_proj`` and ``up_proj`` and column ``n``
of ``down_proj``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_guard.errors import ManifestError
from vllm_guard.secneuron.manifest import MANIFEST_NAME, LayerInfo

_FFN = re.compile(r"^.*\.layers\.(?P<layer>\d+)\.mlp\.(?P<proj>gate|up|down)_proj\.weight$")


@dataclass
class Checkpoint:
    """All tensors of a model directory, in memory, with the file each came from."""

    root: Path
    tensors: dict[str, torch.Tensor]
    files: dict[str, str]  # tensor name -> safetensors file name
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)  # file -> header metadata

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ManifestError(f"no *.safetensors files in {model_dir}")
    return files


def load_checkpoint(model_dir: str | os.PathLike[str]) -> Checkpoint:
    root = Path(model_dir)
    if not root.is_dir():
        raise ManifestError(f"model directory {root} does not exist")
    ckpt = Checkpoint(root, {}, {})
    for path in safetensors_files(root):
        with safe_open(path, framework="pt") as f:
            ckpt.metadata[path.name] = f.metadata() or {}
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                ckpt.tensors[name] = f.get_tensor(name)
                ckpt.files[name] = path.name
    return ckpt


def ffn_layers(names: list[str] | dict) -> dict[int, LayerInfo]:
    """Map each decoder layer to its gate/up/down weight names."""
    found: dict[int, dict[str, str]] = {}
    for name in names:
        m = _FFN.match(name)
        if m:
            found.setdefault(int(m["layer"]), {})[m["proj"]] = name
    return {
        layer: LayerInfo(gate=p["gate"], up=p["up"], down=p["down"], intermediate_size=0)
        for layer, p in sorted(found.items())
        if len(p) == 3
    }


def ffn_layout(ckpt: Checkpoint) -> dict[int, LayerInfo]:
    layers = ffn_layers(list(ckpt.tensors))
    if not layers:
        raise ManifestError(
            f"{ckpt.root}: no gate_proj/up_proj/down_proj weights found; only Llama, Qwen2 and "
            "Mistral-style checkpoints with separate gate/up projections are supported")
    for info in layers.values():
        info.intermediate_size = int(ckpt.tensors[info.gate].shape[0])
    return layers


def slice_tensors(info: LayerInfo) -> list[tuple[str, int]]:
    """(tensor name, neuron axis) of a layer's FFN weights."""
    return [(info.gate, 0), (info.up, 0), (info.down, 1)]


def gather_bytes(t: torch.Tensor, axis: int, idx: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """Copy the neurons' slices out; return the copy and a flat uint8 numpy view of it."""
    sel = t.index_select(axis, idx).contiguous()
    return sel, sel.view(torch.uint8).reshape(-1).numpy()


def save_checkpoint(ckpt: Checkpoint, out_dir: Path) -> None:
    """Write every tensor back to its original file name (shapes and dtypes unchanged)."""
    by_file: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in ckpt.tensors.items():
        by_file.setdefault(ckpt.files[name], {})[name] = t
    for fname, tensors in by_file.items():
        save_file(tensors, str(out_dir / fname), metadata=ckpt.metadata.get(fname) or None)


def copy_side_files(src: Path, dst: Path, skip_manifest: bool) -> None:
    """Copy config, tokenizer and other non-weight files."""
    for p in src.iterdir():
        if p.suffix == ".safetensors" or (skip_manifest and p.name == MANIFEST_NAME):
            continue
        if p.is_file():
            shutil.copy2(p, dst / p.name)


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Write into a temporary sibling and rename at the end; nothing half-written survives."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ManifestError(f"output directory {out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
