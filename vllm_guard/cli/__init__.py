"""``vllm-guard`` command line: serve, demo, grants keys, and the SecNeuron offline tools.

One module per command, each with its parser next to its handler (as in vLLM's
``entrypoints/cli/``): ``register(subparsers)`` adds the parser and sets ``func=run``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vllm_guard.cli import (
    demo,
    extract,
    grants,
    inspect,
    keygen,
    lock,
    rotate,
    scrub,
    serve,
    train_locks,
    unlock,
)
from vllm_guard.errors import GuardError

COMMANDS = (serve, demo, grants, keygen, extract, train_locks, lock, unlock, rotate, inspect,
            scrub)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-guard", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # serve/demo forward unknown options to vLLM untouched.
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "forwards_unknown", False):
        args.vllm_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except GuardError as e:
        print(f"vllm-guard {args.command}: error: {e}", file=sys.stderr)
        return 1
