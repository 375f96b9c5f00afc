"""Worker side of per-request grants.

Each step, after vLLM's V1 model runner prepares its inputs, the task bits of every scheduled
request are written per token into one preallocated int64 buffer (fixed identity, updated in
place: what a once-traced torch.compile graph can see). The masked SiluAndMul op reads it.
Tokens of requests without a verified grant, and padding, get :data:`PUBLIC_BIT` only.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_guard.grants import GRANT_XARG
from vllm_guard.kernels.masked_silu import PUBLIC_BIT
from vllm_guard.log import get_logger

logger = get_logger(__name__)


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


def _request_bits(state, runner_state) -> int:
    cached = getattr(runner_state, "_vllm_guard_bits", None)
    if cached is None:
        params = runner_state.sampling_params
        extra = (params.extra_args or {}) if params is not None else {}
        grant = extra.get(GRANT_XARG)
        cached = state.bits_for(grant if isinstance(grant, str) else None)
        runner_state._vllm_guard_bits = cached
    return cached


def install_runner_hook() -> None:
    """Wrap the V1 runner's ``_prepare_inputs`` (CPU and GPU runners share it)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._prepare_inputs
    if getattr(original, "_vllm_guard", False):
        return

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        out = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        req_ids = self.input_batch.req_ids
        bits = [_request_bits(STATE, self.requests[rid]) for rid in req_ids]
        STATE.fill(bits, num_scheduled_tokens[: len(req_ids)])
        return out

    _prepare_inputs._vllm_guard = True
    GPUModelRunner._prepare_inputs = _prepare_inputs
