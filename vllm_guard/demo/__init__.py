"""The demo: a small model trained on synthetic tasks, locked per task, served with grants
and masking (``vllm-guard demo``). Built on first use, then cached under
``$VLLM_GUARD_CACHE`` (default ``~/.cache/vllm-guard``)."""
