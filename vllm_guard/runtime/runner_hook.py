"""The V1 model-runner hook that fills the grant buffer once per step.

After vLLM's runner prepares a step's inputs, each scheduled request's task bits (from the
``vllm_xargs`` the grant middleware set) are written per token into :data:`STATE`'s buffer.
"""

from __future__ import annotations

from vllm_guard.runtime import GRANT_XARG
from vllm_guard.runtime.grant_state import STATE, GrantState


def _request_bits(state: GrantState, runner_state) -> int:
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
