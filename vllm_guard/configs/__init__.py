"""Example configs shipped with the package (package data, read with ``importlib.resources``).

``vllm-guard serve --masking masking.json`` looks here when the name is not a file on disk.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from vllm_guard.errors import GuardError


def names() -> list[str]:
    return sorted(p.name for p in resources.files(__name__).iterdir()
                  if p.name.endswith((".json", ".txt")))


def path(name: str) -> Path:
    """The packaged config file ``name`` on disk (wheels and checkouts both install files)."""
    ref = resources.files(__name__) / name
    if not ref.is_file():
        raise GuardError(f"no packaged config {name!r} (packaged: {', '.join(names())})")
    return Path(str(ref))
