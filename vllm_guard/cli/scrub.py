"""``vllm-guard scrub``: de-identify JSONL training data, or restore it from a kept mapping."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vllm_guard import envs
from vllm_guard.cli.commands import add_parser
from vllm_guard.cli.common import config_file
from vllm_guard.errors import GuardError, OutputExistsError


def register(sub: argparse._SubParsersAction) -> None:
    # here, not at module level: the masking engine is only wanted when scrub runs (or --help)
    from vllm_guard.masking.scrub import DEFAULT_FIELDS

    s = add_parser(sub, "scrub")
    s.add_argument("input", type=Path, help="JSONL file, one object per line")
    s.add_argument("output", type=Path, help="JSONL file to write (refused if it exists, "
                   "unless --force)")
    s.add_argument("--fields", default=",".join(DEFAULT_FIELDS),
                   help="comma-separated fields whose every string is scrubbed (chat "
                        "messages, ShareGPT conversations, nested parts); other fields are "
                        "copied only if they hold no sensitive value")
    s.add_argument("--masking", default="masking.json",
                   help="masking config: entities, strategies, NER profile, context rules "
                        "(default: the packaged masking.json)")
    s.add_argument("--keep-mapping", type=Path, metavar="FILE",
                   help=f"write the stand-in -> value mapping sealed with ${envs.SCRUB_KEY} "
                        "(with --restore: read it)")
    s.add_argument("--restore", action="store_true",
                   help="put the kept values back into a scrubbed file (or model outputs)")
    s.add_argument("--report", type=Path, metavar="FILE", help="counts per entity, as JSON")
    s.add_argument("--force", action="store_true", help="overwrite the output files")
    s.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vllm_guard.masking.config import MaskingConfig
    from vllm_guard.masking.detection.detector import build_detector
    from vllm_guard.masking.scrub import (
        Scrubber,
        load_mapping,
        restore_file,
        save_mapping,
        scrub_file,
    )
    from vllm_guard.masking.strategies import make_stand_ins
    from vllm_guard.masking.vault import load_env_key

    fields = [f for f in args.fields.split(",") if f]
    if not args.input.is_file():
        raise GuardError(f"input {args.input} is not a file")
    outputs = [args.output] + [p for p in (args.report,) if p]
    if not args.restore and args.keep_mapping:
        outputs.append(args.keep_mapping)
    for path in outputs:
        if path.exists() and not args.force:
            raise OutputExistsError(f"{path} exists (use --force to overwrite)")
    if args.restore and not args.keep_mapping:
        raise GuardError("--restore needs --keep-mapping FILE")
    key = (load_env_key(envs.SCRUB_KEY, "sealing the scrub mapping")
           if args.keep_mapping else None)
    bar = tqdm(total=args.input.stat().st_size, unit="B", unit_scale=True, file=sys.stderr,
               desc="restore" if args.restore else "scrub", disable=args.no_progress)
    try:
        if args.restore:
            mapping = load_mapping(args.keep_mapping, key)
            report = restore_file(args.input, args.output, mapping, fields, bar.update)
            print(f"restored {report.lines} lines -> {args.output}", file=sys.stderr)
            return 0
        config = MaskingConfig.load(config_file(args.masking))
        scrubber = Scrubber(build_detector(config), fields, make_stand_ins(config))
        report = scrub_file(args.input, args.output, scrubber, bar.update)
    finally:
        bar.close()
    if args.keep_mapping:
        save_mapping(args.keep_mapping, scrubber.mapping, key)
    summary = report.to_json()
    if args.report:
        args.report.write_text(json.dumps(summary, indent=1) + "\n")
    counts = ", ".join(f"{e} {n}" for e, n in summary["masked"].items()) or "nothing"
    print(f"scrubbed {summary['lines']} lines ({summary['mb_per_s']} MB/s): masked {counts} "
          f"-> {args.output}", file=sys.stderr)
    return 0
