"""Every environment variable vllm-guard reads, in one place (as ``vllm/envs.py`` does).

Names are constants so that code and docs refer to one spelling; values are read when asked
for, never at import, so a process sees what its parent set just before starting it.
"""

from __future__ import annotations

import os
from pathlib import Path

GRANTS = "VLLM_GUARD_GRANTS"
MASKING = "VLLM_GUARD_MASKING"
KEYS = "VLLM_GUARD_KEYS"
PUBLISHER_KEY = "VLLM_GUARD_PUBLISHER_KEY"
VAULT_KEY = "VLLM_GUARD_VAULT_KEY"
SESSION_KEY = "VLLM_GUARD_SESSION_KEY"
CACHE = "VLLM_GUARD_CACHE"
SCRUB_KEY = "VLLM_GUARD_SCRUB_KEY"
FPE_KEY = "VLLM_GUARD_FPE_KEY"

ENVIRONMENT_VARIABLES: dict[str, str] = {
    GRANTS: "path of the grants file; set by `vllm-guard serve --grants`, turns on per-request "
            "task grants in every vLLM process",
    MASKING: "path of the masking config; set by `vllm-guard serve --masking`",
    KEYS: "task key files or directories (os.pathsep-separated) for --load-format secneuron, "
          "when the loader config names none",
    PUBLISHER_KEY: "publisher public key for --load-format secneuron, when the loader config "
                   "names none",
    VAULT_KEY: "base64 AES-256 key of the Redis vault (the masking config's vault_key_env "
               "default)",
    SESSION_KEY: "base64 key that binds masking sessions to principals with Redis (the "
                 "masking config's session_key_env default)",
    CACHE: "where demo models are built and cached (default ~/.cache/vllm-guard)",
    SCRUB_KEY: "base64 AES-256 key that seals `vllm-guard scrub --keep-mapping` files",
    FPE_KEY: "base64 AES-256 key of the masking `fpe` strategy (FF3-1; the masking config's "
             "fpe_key_env default)",
}


def get(name: str) -> str | None:
    """The variable's value, or None when unset or empty."""
    if name not in ENVIRONMENT_VARIABLES:
        raise KeyError(f"{name} is not a vllm-guard environment variable")
    return os.environ.get(name) or None


def cache_dir() -> Path:
    """Root of vllm-guard's build cache."""
    value = get(CACHE)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "vllm-guard"
