"""The demo: a small model trained on synthetic tasks, locked per task, served with grants
and masking (``vllm-guard demo``). Built on first use, then cached under
``$VLLM_GUARD_CACHE`` (default ``~/.cache/vllm-guard``).

``tasks`` the three tasks, their splits and the multitask base model; ``recipe`` what the
demo builds and the bar it must meet; ``build`` the cached build; ``check`` the offline
accuracy check under a grant; ``api_keys`` the two API keys and the grants file; ``serving``
the vLLM arguments; ``guide`` the printed keys and ``curl`` commands.
"""
