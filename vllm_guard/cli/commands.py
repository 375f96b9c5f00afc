"""The command table: each command's name, module and one-line help.

``vllm-guard --help`` lists every command from this table without importing any command
module; a command's module (its parser and handler) is imported only when that command runs
or its ``--help`` is asked. Importing them all up front cost seconds (``scrub`` pulled in
Presidio, torch and transformers) on every invocation, ``keygen --help`` included.

Keep this module cheap: stdlib only.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class Command:
    module: str  # defines register(subparsers) and the handler it sets as func
    help: str  # the line shown by `vllm-guard --help`; the only place it is spelled


# in the order `vllm-guard --help` lists them
COMMANDS: dict[str, Command] = {
    "serve": Command("vllm_guard.cli.serve",
                     "start vLLM's OpenAI server with vllm-guard enabled; other arguments go to "
                     "vLLM unchanged"),
    "demo": Command("vllm_guard.cli.demo",
                    "build the demo model (first run, 1-2 min) and serve it on 127.0.0.1 with "
                    "two API keys and masking; other arguments go to vLLM"),
    "grants-add-key": Command("vllm_guard.cli.grants",
                              "create an API key (stored hashed) in a grants file"),
    "keygen": Command("vllm_guard.cli.keygen",
                      "write a 256-bit task key (or an Ed25519 signing key)"),
    "extract": Command("vllm_guard.cli.extract", "select task-specific FFN neurons"),
    "train-locks": Command("vllm_guard.cli.train_locks",
                           "fine-tune a model to respect its neuron locks (masked grants + "
                           "collapse objective)"),
    "lock": Command("vllm_guard.cli.lock",
                    "encrypt the selected neurons into a locked checkpoint"),
    "unlock": Command("vllm_guard.cli.unlock",
                      "write a plaintext checkpoint for the given keys"),
    "rotate": Command("vllm_guard.cli.rotate",
                      "--revoke TASK: re-encrypt so TASK's key opens nothing; --task: re-wrap "
                      "under a new key (lost key; does not revoke)"),
    "inspect": Command("vllm_guard.cli.inspect",
                       "manifest summary and ciphertext detector per layer"),
    "scrub": Command("vllm_guard.cli.scrub",
                     "mask sensitive values in JSONL training data (or restore them with "
                     "--restore)"),
}


def load(name: str) -> ModuleType:
    """The module of command ``name`` (imported now, on first use)."""
    return importlib.import_module(COMMANDS[name].module)


def add_parser(sub: argparse._SubParsersAction, name: str,
               **kwargs: Any) -> argparse.ArgumentParser:
    """Command ``name``'s parser, with its help line from the table (so the stub listed by
    ``vllm-guard --help`` and the real parser cannot disagree)."""
    return sub.add_parser(name, help=COMMANDS[name].help, **kwargs)
