"""Helpers the SecNeuron commands share: NAME=PATH pairs, task keys, the publisher key."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from vllm_guard.errors import GuardError


def parse_pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise GuardError(f"{what} must look like NAME=PATH, got {item!r}")
        out[name] = value
    return out


def load_keys(items: Sequence[str]):
    from vllm_guard.secneuron.keys import load_task_keys

    paths = list(parse_pairs(items, "--key").values()) if items and "=" in items[0] else items
    keys = load_task_keys(paths)
    if items and "=" in items[0]:
        for task, path in parse_pairs(items, "--key").items():
            if task not in keys:
                raise GuardError(f"key file {path} is for another task, not {task!r}")
    return keys


def publisher(args: argparse.Namespace):
    from vllm_guard.secneuron.keys import load_public_key

    return load_public_key(args.publisher_key) if args.publisher_key else None


def config_file(name: str) -> str:
    """A config path as given, or a packaged example config by its bare name
    (``--masking masking.json`` works from an installed wheel too)."""
    from vllm_guard import configs

    if Path(name).exists() or Path(name).name != name or name not in configs.names():
        return name
    return str(configs.path(name))
