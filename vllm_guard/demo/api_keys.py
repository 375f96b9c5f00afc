"""The demo's API keys: bearer tokens made once, kept 0600, and a grants file of their hashes.

The grants file stores only SHA-256 digests (as ``vllm-guard grants-add-key`` does), so it
could be shown to anyone; the tokens themselves live in ``api-keys.json`` beside it, which
only the owner can read, because the demo prints them on every start.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from vllm_guard.errors import GuardError

TOKENS_FILE = "api-keys.json"
GRANTS_FILE = "grants.json"


@dataclass(frozen=True)
class DemoApiKey:
    name: str
    tasks: tuple[str, ...]
    token: str = field(repr=False)  # never in logs or reprs


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # also when the file existed with a wider mode


def create_api_keys(root: Path, grants: dict[str, tuple[str, ...]],
                    tasks: tuple[str, ...]) -> tuple[DemoApiKey, ...]:
    """New tokens for ``grants`` (name -> tasks): tokens to ``api-keys.json`` (0600), their
    hashes to ``grants.json`` (mode "required": no key, no answer)."""
    from vllm_guard.grants.credentials import GrantsConfig, hash_api_key, new_api_key

    keys = tuple(DemoApiKey(name, tuple(granted), new_api_key())
                 for name, granted in grants.items())
    _write_private(root / TOKENS_FILE, json.dumps(
        [{"name": k.name, "tasks": list(k.tasks), "token": k.token} for k in keys], indent=1))
    (root / GRANTS_FILE).write_text(json.dumps({
        "mode": "required", "tasks": list(tasks),
        "api_keys": [{"name": k.name, "sha256": hash_api_key(k.token), "tasks": list(k.tasks)}
                     for k in keys],
        "revoked": []}, indent=1) + "\n")
    GrantsConfig.load(root / GRANTS_FILE)  # the server must accept what was written
    return keys


def load_api_keys(root: Path) -> tuple[DemoApiKey, ...]:
    path = root / TOKENS_FILE
    try:
        rows = json.loads(path.read_text())
        return tuple(DemoApiKey(str(r["name"]), tuple(r["tasks"]), str(r["token"]))
                     for r in rows)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GuardError(f"cannot read the demo API keys {path} ({type(e).__name__}); delete "
                         f"{root} to rebuild the demo") from None
