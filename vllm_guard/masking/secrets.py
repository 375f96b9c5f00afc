"""The secrets a masking config needs, checked before anything starts (``serve`` runs this in
its parent process, so it imports no detector: that would load Presidio)."""

from __future__ import annotations

from vllm_guard.masking.config import MaskingConfig
from vllm_guard.masking.sessions import load_session_key
from vllm_guard.masking.strategies import make_stand_ins
from vllm_guard.masking.vault import load_vault_key


def check_secrets(config: MaskingConfig) -> None:
    """The keys the config needs are in the environment (one-line startup errors)."""
    if config.vault == "redis":
        load_vault_key(config.vault_key_env)
        load_session_key(config.session_key_env, required=True)
    make_stand_ins(config)
