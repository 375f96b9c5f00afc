"""Distribution-based detection of ciphertext in FFN neurons (SecNeuron's defence in depth).

AES output read as fp32/fp16/bf16 is uniform over bit patterns: a third to a half of the
values are NaN/Inf or larger than 64, so every stretch of a few dozen values holds one.
Trained or randomly initialised neurons hold none. Each neuron's gate row, up row and down
column are cut in halves (six segments); a neuron is flagged when at least
``min_segments`` of them contain a non-finite value or one above ``abs_threshold``.
A single outlier weight therefore never flags a real neuron. Only max-reductions are used,
so scanning every FFN neuron of a 0.5B model takes a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_guard.secneuron.manifest import LayerInfo
from vllm_guard.secneuron.options import DetectorConfig

DEFAULT_DETECTOR = DetectorConfig()


@dataclass
class LayerVerdict:
    layer: int
    neurons: int
    encrypted: torch.Tensor  # bool [I]
    zeroed: torch.Tensor  # bool [I]

    def summary(self) -> dict[str, int]:
        return {"neurons": self.neurons, "encrypted": int(self.encrypted.sum()),
                "zeroed": int(self.zeroed.sum())}


def _segment_max(t: torch.Tensor, axis: int) -> torch.Tensor:
    """[2, I] max |w| of each half of every neuron's vector (NaN propagates).

    One min/max pass per half, no ``abs`` copy of the tensor: |w| max = max(max, -min)."""
    h = t.shape[1 - axis] // 2
    halves = (t[:, :h], t[:, h:]) if axis == 0 else (t[:h], t[h:])
    out = []
    for part in halves:
        lo, hi = torch.aminmax(part, dim=1 - axis)
        out.append(torch.maximum(hi.float(), lo.float().neg()))
    return torch.stack(out)


def scan_layer(
    layer: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
    config: DetectorConfig = DEFAULT_DETECTOR,
) -> LayerVerdict:
    maxima = torch.cat([_segment_max(gate, 0), _segment_max(up, 0), _segment_max(down, 1)])
    suspicious = ~(maxima <= config.abs_threshold)  # also True for NaN
    encrypted = suspicious.sum(0) >= config.min_segments
    return LayerVerdict(layer, int(gate.shape[0]), encrypted, (maxima == 0).all(0))


def scan_tensors(
    tensors: dict[str, torch.Tensor], layers: dict[int, LayerInfo],
    config: DetectorConfig = DEFAULT_DETECTOR,
) -> list[LayerVerdict]:
    return [scan_layer(i, tensors[info.gate], tensors[info.up], tensors[info.down], config)
            for i, info in sorted(layers.items())]
