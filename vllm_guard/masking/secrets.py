"""The secrets a masking config needs, checked before anything starts (``serve`` runs this in
its parent process, so it imports no detector: that would load Presidio)."""

from __future__ import annotations

from collections.abc import Callable

from vllm_guard.errors import GuardError
from vllm_guard.masking.config import MaskingConfig
from vllm_guard.masking.sessions import load_session_key
from vllm_guard.masking.strategies import make_stand_ins
from vllm_guard.masking.vault import load_vault_key


def check_secrets(config: MaskingConfig) -> None:
    """The keys the config needs are in the environment: every missing or bad one named in
    one line (one per run cost a restart each)."""
    checks: list[Callable[[], object]] = [lambda: make_stand_ins(config)]
    if config.vault == "redis":
        checks[:0] = [lambda: load_vault_key(config.vault_key_env),
                      lambda: load_session_key(config.session_key_env, required=True)]
    problems = []
    for check in checks:
        try:
            check()
        except GuardError as e:
            problems.append(str(e))
    if problems:
        raise GuardError("; ".join(problems))
