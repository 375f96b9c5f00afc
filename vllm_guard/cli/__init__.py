"""``vllm-guard`` command line: serve, demo, grants keys, and the SecNeuron offline tools.

One module per command, each with its parser next to its handler (as in vLLM's
``entrypoints/cli/``): ``register(subparsers)`` adds the parser and sets ``func=run``. The
command table (``commands.py``) names each module, which is imported only when its command
runs or its ``--help`` is asked, so ``vllm-guard keygen --help`` does not load torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vllm_guard.cli.commands import COMMANDS, load
from vllm_guard.errors import GuardError


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser: the real parser of ``command`` (its module imported) and, for
    every other command, a stub that only carries its help line for ``vllm-guard --help``."""
    from vllm_guard import __version__

    p = argparse.ArgumentParser(prog="vllm-guard", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"vllm-guard {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, entry in COMMANDS.items():
        if name == command:
            load(name).register(sub)
        else:
            sub.add_parser(name, help=entry.help, add_help=False)
    return p


def command_name(argv: Sequence[str]) -> str | None:
    """The command ``argv`` runs: its first positional (the top level has no option that
    takes a value: -h and --version only)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(command_name(argv))
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
        return getattr(e, "exit_code", 1)  # 2 for a usage error, as argparse
