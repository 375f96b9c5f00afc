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


_BITS = {torch.float32: (torch.int32, 0x7FFFFFFF), torch.float16: (torch.int16, 0x7FFF),
         torch.bfloat16: (torch.int16, 0x7FFF)}


def _halves(t: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    h = t.shape[1 - axis] // 2
    return (t[:, :h], t[:, h:]) if axis == 0 else (t[:h], t[h:])


def _segment_max(t: torch.Tensor, axis: int) -> torch.Tensor:
    """[2, I] max |w| of each half of every neuron's vector (NaN propagates).

    One min/max pass per half, no ``abs`` copy of the tensor: |w| max = max(max, -min)."""
    out = []
    for part in _halves(t, axis):
        lo, hi = torch.aminmax(part, dim=1 - axis)
        out.append(torch.maximum(hi.float(), lo.float().neg()))
    return torch.stack(out)


def _below(threshold: float, dtype: torch.dtype) -> int:
    """Bits of the largest ``dtype`` value <= ``threshold`` (|w| > it iff |w| > threshold)."""
    as_int, _ = _BITS[dtype]
    t = torch.tensor(threshold, dtype=torch.float64).to(dtype)
    bits = int(t.view(as_int))
    return bits - 1 if float(t) > threshold else bits


def _segment_flags(t: torch.Tensor, axis: int, threshold: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """[2, I] (some |w| > threshold or non-finite, all zero) per half of every neuron.

    For IEEE floats, |w| orders as the integer of w's bits without the sign, and NaN/Inf sit
    above every finite value: one integer max per half, no float conversion (7-12x the
    aminmax above on bf16, measured on one core). Other dtypes take the float path."""
    if t.dtype not in _BITS:
        maxima = _segment_max(t, axis)
        return ~(maxima <= threshold), maxima == 0
    as_int, mask = _BITS[t.dtype]
    limit = _below(threshold, t.dtype)
    top = torch.stack([(part.view(as_int) & mask).amax(dim=1 - axis)
                       for part in _halves(t, axis)])
    return top > limit, top == 0


def scan_layer(
    layer: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
    config: DetectorConfig = DEFAULT_DETECTOR,
) -> LayerVerdict:
    flags = [_segment_flags(t, axis, config.abs_threshold)
             for t, axis in ((gate, 0), (up, 0), (down, 1))]
    suspicious = torch.cat([f[0] for f in flags])
    zero = torch.cat([f[1] for f in flags])
    encrypted = suspicious.sum(0) >= config.min_segments
    return LayerVerdict(layer, int(gate.shape[0]), encrypted, zero.all(0))


def scan_tensors(
    tensors: dict[str, torch.Tensor], layers: dict[int, LayerInfo],
    config: DetectorConfig = DEFAULT_DETECTOR,
) -> list[LayerVerdict]:
    return [scan_layer(i, tensors[info.gate], tensors[info.up], tensors[info.down], config)
            for i, info in sorted(layers.items())]


def scan_block(t: torch.Tensor, axis: int, idx: list[int],
               config: DetectorConfig = DEFAULT_DETECTOR) -> int:
    """How many of the rows (``axis`` 0) or columns (1) ``idx`` of ``t`` (one block) look
    encrypted: both halves of the vector hold a non-finite value or one above the threshold.
    For sealed heads' q/k/v rows and o_proj columns, which have no gate/up/down triple."""
    if not idx:
        return 0
    suspicious, _ = _segment_flags(t.narrow(axis, idx[0], len(idx)), axis,
                                   config.abs_threshold)
    return int((suspicious.sum(0) >= 2).sum())
