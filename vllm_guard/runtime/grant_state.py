"""Per-request grants in the worker: task -> bit, and the per-token grant buffer.

Each step, after vLLM's V1 model runner prepares its inputs, the task bits of every scheduled
request are written per token into one preallocated int64 buffer (fixed identity, updated in
place: what a once-traced torch.compile graph can see). The masked SiluAndMul op reads it.
Tokens of requests without a verified grant, and padding, get :data:`PUBLIC_BIT` only.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_guard.runtime import PUBLIC_BIT


class GrantState:
    """Process-wide: task -> bit (from the loaded manifest) and the per-token grant buffer."""

    def __init__(self) -> None:
        self.task_bits: dict[str, int] = {}
        self.buffer: torch.Tensor | None = None
        self.filled = 0

    def ensure_buffer(self, size: int) -> torch.Tensor:
        if self.buffer is None:
            self.buffer = torch.full((size,), PUBLIC_BIT, dtype=torch.int64)
        return self.buffer

    def bits_for(self, grant: str | None) -> int:
        """Task bits of a grant string; unknown tasks grant nothing (default deny)."""
        bits = PUBLIC_BIT
        for task in (grant or "").split(","):
            if task in self.task_bits:
                bits |= 1 << self.task_bits[task]
        return bits

    def fill(self, per_request_bits: list[int], num_tokens: np.ndarray) -> None:
        buf = self.buffer
        if buf is None:
            return
        tokens = np.repeat(np.asarray(per_request_bits, dtype=np.int64), num_tokens)
        n = len(tokens)
        if n > buf.shape[0]:
            raise RuntimeError(f"{n} tokens in a step, grant buffer holds {buf.shape[0]}")
        buf[:n].copy_(torch.from_numpy(tokens))
        if self.filled > n:
            buf[n:self.filled].fill_(PUBLIC_BIT)
        self.filled = n


STATE = GrantState()
