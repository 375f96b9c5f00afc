"""``vllm-guard unlock``: write a plaintext checkpoint for the given keys."""

from __future__ import annotations

import argparse

from vllm_guard.cli.commands import add_parser
from vllm_guard.cli.common import load_keys, publisher


def register(sub: argparse._SubParsersAction) -> None:
    s = add_parser(sub, "unlock")
    s.add_argument("--model", required=True, help="locked checkpoint directory")
    s.add_argument("--key", action="append", default=[], metavar="KEYFILE",
                   help="task key to open (repeatable; the others' neurons are zeroed)")
    s.add_argument("--publisher-key", help="publisher public key (.pub): the manifest must "
                   "be signed by it")
    s.add_argument("--allow-unsigned", action="store_true",
                   help="accept a manifest without a signature")
    s.add_argument("--min-version", type=int, default=0,
                   help="refuse a checkpoint whose signed version is lower (rollback)")
    s.add_argument("--out", required=True, help="plaintext checkpoint directory to write")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vllm_guard.secneuron.unlock import unlock_checkpoint

    report = unlock_checkpoint(args.model, load_keys(args.key), args.out, publisher(args),
                               args.allow_unsigned, min_version=args.min_version)
    print(f"opened tasks {report.tasks} ({len(report.opened_groups)} groups), zeroed "
          f"{len(report.locked_groups)} groups; {report.bytes_decrypted / 1e6:.1f} MB in "
          f"{report.seconds:.2f} s -> {args.out}")
    return 0
