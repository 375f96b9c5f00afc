"""``vllm-guard inspect``: manifest summary and the ciphertext detector per layer."""

from __future__ import annotations

import argparse
import json

from vllm_guard.cli.commands import add_parser
from vllm_guard.cli.common import publisher


def register(sub: argparse._SubParsersAction) -> None:
    s = add_parser(sub, "inspect")
    s.add_argument("--model", required=True, help="checkpoint directory (locked or not)")
    s.add_argument("--publisher-key", help="publisher public key (.pub) to check the "
                   "signature against")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vllm_guard.secneuron.inspect import inspect_checkpoint

    report = inspect_checkpoint(args.model, publisher(args))
    text = report.pop("text")
    print(json.dumps(report, indent=1) if args.json else text)
    return 0
