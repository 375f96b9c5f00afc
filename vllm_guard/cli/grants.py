"""``vllm-guard grants-add-key``: create an API key (stored hashed) in a grants file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_guard.cli.commands import add_parser
from vllm_guard.errors import GuardError


def register(sub: argparse._SubParsersAction) -> None:
    s = add_parser(sub, "grants-add-key")
    s.add_argument("--file", required=True,
                   help="grants file to add the key to (created if missing)")
    s.add_argument("--name", required=True,
                   help="the key's name: in logs, and what 'revoked' may list")
    s.add_argument("--task", action="append", default=[],
                   help="granted task (repeatable; at least one unless --public-only)")
    s.add_argument("--model", help="the locked checkpoint served with this file: only its "
                   "task names are accepted (default: the file's own 'tasks' list)")
    s.add_argument("--public-only", action="store_true",
                   help="a key that authenticates but opens no locked task (no --task)")
    s.set_defaults(func=run)


def checkpoint_tasks(model: str) -> list[str]:
    """The task names in the checkpoint's manifest (a typo would get public-only answers)."""
    from vllm_guard.secneuron.manifest import MANIFEST_NAME, read_manifest

    manifest = read_manifest(model) if Path(model).is_dir() else None
    if manifest is None:
        raise GuardError(f"{model} has no {MANIFEST_NAME}: --model must be the locked "
                         "checkpoint this grants file is served with")
    return sorted(manifest.tasks)


def run(args: argparse.Namespace) -> int:
    from vllm_guard.grants.credentials import TASK_NAME, hash_api_key, new_api_key

    bad = [t for t in args.task if not TASK_NAME.fullmatch(t)]
    if bad:  # the file would no longer load
        raise GuardError(f"task name {bad[0]!r} must match [A-Za-z0-9_.-]+")
    if args.task and args.public_only:
        raise GuardError("--public-only keys have no --task: give one or the other")
    if not args.task and not args.public_only:
        raise GuardError("give at least one --task (or --public-only for a key that opens no "
                         "locked task)")
    path = Path(args.file)
    try:
        doc = json.loads(path.read_text()) if path.exists() else {"mode": "required",
                                                                  "api_keys": [], "revoked": []}
    except ValueError as e:
        raise GuardError(f"{path} is not valid JSON: {e}") from None
    if args.task:  # an unchecked typo would get public-only answers
        if args.model:
            known, source = checkpoint_tasks(args.model), args.model
        elif isinstance(doc.get("tasks"), list):
            known, source = sorted(doc["tasks"]), f"{path}'s 'tasks'"
        else:
            raise GuardError(f"pass --model DIR (the locked checkpoint) to check the task names: "
                             f"{path} has no 'tasks' list")
        unknown = sorted(set(args.task) - set(known))
        if unknown:
            raise GuardError(f"task(s) {unknown} are not tasks of {source} (its tasks: "
                             f"{known})")
    if any(k["name"] == args.name for k in doc.setdefault("api_keys", [])):
        raise GuardError(f"an API key named {args.name!r} already exists in {path}")
    token = new_api_key()
    doc["api_keys"].append({"name": args.name, "sha256": hash_api_key(token),
                            "tasks": sorted(set(args.task))})
    path.write_text(json.dumps(doc, indent=1) + "\n")
    grant = f"for tasks {sorted(set(args.task))}" if args.task else "(public-only: no task)"
    print(f"added API key {args.name!r} {grant} to {path}; it is shown once:")
    print(token)
    return 0
