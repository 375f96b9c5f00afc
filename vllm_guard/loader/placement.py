"""Where the model keeps each checkpoint tensor: run ``model.load_weights`` once on
placeholders and record, without copying, where each weight loader copies it.

A tensor is placed when its loader's only use of it is one plain ``copy_`` of the whole
tensor (views of it aside) into contiguous CPU memory of the same dtype and shape: then
reading the file's bytes straight there is exactly what the loader would have done, minus a
copy. Any other use (a conversion, a transpose, a partial copy for tensor parallelism, two
tensors into one place, an arithmetic op) makes the whole plan unusable and the caller
loads through ``model.load_weights`` as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_COPY = torch.ops.aten.copy_.default


@dataclass
class Placement:
    """Checkpoint name -> the model's memory for it; ``loaded`` what load_weights returned;
    ``refused``: why the plan cannot be used (None when it can)."""

    dest: dict[str, torch.Tensor] = field(default_factory=dict)
    loaded: object = None
    refused: str | None = None


class _Capture(TorchDispatchMode):
    def __init__(self, probes: dict[str, torch.Tensor]):
        super().__init__()
        self.probes = probes
        self.by_storage = {p.untyped_storage().data_ptr(): n for n, p in probes.items()
                           if p.numel()}  # empty tensors share no memory: nothing to place
        self.plan = Placement()
        self.taken: list[tuple[int, int, str]] = []
        self.placed: dict[int, str] = {}  # storage of a destination -> a name placed there

    def _probe(self, t: object) -> str | None:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            return self.by_storage.get(t.untyped_storage().data_ptr())
        return None

    def _refuse(self, why: str) -> None:
        self.plan.refused = self.plan.refused or why

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _COPY and len(args) >= 2:
            dst, src = args[0], args[1]
            name = self._probe(src)
            if name is not None:
                self._place(name, dst, src)
                return dst  # the bytes come later, read straight into dst
        if not func.is_view:
            for t in tree_leaves((args, kwargs)):
                name = self._probe(t)
                if name is not None:
                    self._refuse(f"{name}: the loader computes with it ({func})")
                placed = self._placed(t)
                if placed is not None:  # e.g. scaled after the copy: the file's bytes
                    self._refuse(f"{placed}: the loader changes it after copying ({func})")
        return func(*args, **kwargs)

    def _placed(self, t: object) -> str | None:
        """The placed tensor whose bytes ``t`` covers, if any (vocab padding rows beside a
        placed embedding are filled after the copy: the same storage, other bytes)."""
        if not (isinstance(t, torch.Tensor) and t.device.type == "cpu" and self.taken
                and t.untyped_storage().data_ptr() in self.placed):
            return None
        lo, hi = _span(t)
        return next((name for a, b, name in self.taken if a < hi and lo < b), None)

    def _place(self, name: str, dst: torch.Tensor, src: torch.Tensor) -> None:
        probe = self.probes[name]
        if (src.data_ptr() != probe.data_ptr() or src.shape != probe.shape
                or src.stride() != probe.stride()):
            return self._refuse(f"{name}: copied in parts or reshaped")
        if (dst.dtype != src.dtype or dst.shape != src.shape or not dst.is_contiguous()
                or dst.device.type != "cpu"):
            return self._refuse(f"{name}: copied into {dst.dtype}{list(dst.shape)} on "
                                f"{dst.device}")
        if name in self.plan.dest:
            return self._refuse(f"{name}: copied twice")
        lo = dst.data_ptr()
        hi = lo + dst.numel() * dst.element_size()
        for a, b, other in self.taken:
            if a < hi and lo < b:
                return self._refuse(f"{name} and {other} go to the same memory")
        self.taken.append((lo, hi, name))
        self.placed[dst.untyped_storage().data_ptr()] = name
        self.plan.dest[name] = dst.detach()


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte addresses ``t`` reads or writes."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    es = t.element_size()
    lo = t.data_ptr() + es * sum(min(0, (n - 1) * st) for n, st in zip(t.shape, t.stride(),
                                                                        strict=True))
    hi = t.data_ptr() + es * (1 + sum(max(0, (n - 1) * st) for n, st in
                                      zip(t.shape, t.stride(), strict=True)))
    return lo, hi


def capture_placement(model: nn.Module,
                      tensors: Iterable[tuple[str, torch.dtype, list[int]]]) -> Placement:
    """Run ``model.load_weights`` on placeholders (never-touched memory of each tensor's
    dtype and shape) and record where each is copied. The model's parameters are not
    written (every copy of a placeholder is skipped), so after a refused plan the caller
    loads normally."""
    probes = {name: torch.empty(shape, dtype=dtype) for name, dtype, shape in tensors}
    mode = _Capture(probes)
    with mode:
        loaded = model.load_weights(iter(list(probes.items())))
    mode.plan.loaded = loaded
    kept = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    held = sorted(n for ptr, n in mode.by_storage.items() if ptr in kept)
    if held:  # e.g. ``param.data = loaded_weight``: no copy_ to see
        mode._refuse(f"{held[0]}: the model keeps the tensor itself")
    gone = sorted(n for ptr, n in mode.placed.items() if ptr not in kept)
    if gone:  # the parameter copied into was replaced afterwards: its memory is unused
        mode._refuse(f"{gone[0]}: the model no longer holds the memory it was copied into")
    return mode.plan
