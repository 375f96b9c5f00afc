"""``vllm-guard extract``: select task-specific FFN neurons (SecNeuron)."""

from __future__ import annotations

import argparse
import json

from vllm_guard.cli.commands import add_parser
from vllm_guard.cli.common import parse_pairs


def register(sub: argparse._SubParsersAction) -> None:
    s = add_parser(sub, "extract")
    s.add_argument("--model", required=True, help="plaintext model directory (safetensors)")
    s.add_argument("--task", action="append", required=True, metavar="NAME=CALIB.jsonl",
                   help="a task's calibration prompts/answers, JSONL (repeatable, one per task)")
    s.add_argument("--fraction", type=float, default=0.05,
                   help="share of each layer's FFN neurons given to each task (default 0.05)")
    s.add_argument("--lambda", dest="lam", type=float, default=0.8,
                   help="specificity: importance minus LAMBDA x the other tasks' highest "
                   "(default 0.8)")
    s.add_argument("--max-examples", type=int, default=256,
                   help="calibration examples read per task (default 256)")
    s.add_argument("--out", default="selection.json",
                   help="selection file to write (default selection.json)")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vllm_guard.secneuron.extract import ExtractConfig, extract

    config = ExtractConfig(fraction=args.fraction, lam=args.lam, max_examples=args.max_examples)
    selection = extract(args.model, parse_pairs(args.task, "--task"), config)
    selection.save(args.out)
    print(json.dumps({k: v for k, v in selection.info["summary"].items() if k != "groups"}))
    print(f"wrote neuron selection to {args.out}")
    return 0
