"""Distribution-based detection of ciphertext in FFN neurons (SecNeuron's defence in depth).

AES output read as fp32/fp16/bf16 is uniform over bit patterns: a third to a half of the
values are NaN/Inf or huge. Trained or randomly initialised neurons have none of that. A
neuron is flagged when more than ``max_outlier_fraction`` of its gate row, up row and down
column are non-finite or larger than ``abs_threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_guard.secneuron.manifest import LayerInfo


@dataclass(frozen=True)
class DetectorConfig:
    abs_threshold: float = 64.0
    max_outlier_fraction: float = 0.05


@dataclass
class LayerVerdict:
    layer: int
    neurons: int
    encrypted: torch.Tensor  # bool [I]
    zeroed: torch.Tensor  # bool [I]

    def summary(self) -> dict[str, int]:
        return {"neurons": self.neurons, "encrypted": int(self.encrypted.sum()),
                "zeroed": int(self.zeroed.sum())}


def _outliers(t: torch.Tensor, axis: int, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per neuron: count of suspicious values, and whether the slice is all zero."""
    x = t.float()
    bad = ~torch.isfinite(x) | (x.abs() > threshold)
    other = 1 - axis
    return bad.sum(dim=other), (x == 0).all(dim=other)


def scan_layer(
    layer: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
    config: DetectorConfig = DetectorConfig(),
) -> LayerVerdict:
    counts, zero = torch.zeros(gate.shape[0], dtype=torch.long), None
    total = 0
    for t, axis in ((gate, 0), (up, 0), (down, 1)):
        c, z = _outliers(t, axis, config.abs_threshold)
        counts += c
        zero = z if zero is None else zero & z
        total += t.shape[1 - axis]
    encrypted = counts.float() / total > config.max_outlier_fraction
    return LayerVerdict(layer, int(gate.shape[0]), encrypted, zero)


def scan_tensors(
    tensors: dict[str, torch.Tensor], layers: dict[int, LayerInfo],
    config: DetectorConfig = DetectorConfig(),
) -> list[LayerVerdict]:
    return [scan_layer(i, tensors[info.gate], tensors[info.up], tensors[info.down], config)
            for i, info in sorted(layers.items())]
