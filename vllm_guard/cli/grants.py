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
                   help="granted task (repeatable; at least one)")
    s.add_argument("--model", help="the locked checkpoint served with this file: only its "
                   "task names are accepted")
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
    if not args.task:
        raise GuardError("give at least one --task: a key with no task gets no locked task")
    if not args.model:
        raise GuardError("give --model DIR, the locked checkpoint, to check the task names "
                         "against")
    known = checkpoint_tasks(args.model)
    unknown = sorted(set(args.task) - set(known))
    if unknown:
        raise GuardError(f"task(s) {unknown} are not tasks of {args.model} (its tasks: "
                         f"{known})")
    path = Path(args.file)
    doc = json.loads(path.read_text()) if path.exists() else {"mode": "required",
                                                              "api_keys": [], "revoked": []}
    if any(k["name"] == args.name for k in doc.setdefault("api_keys", [])):
        raise GuardError(f"an API key named {args.name!r} already exists in {path}")
    token = new_api_key()
    doc["api_keys"].append({"name": args.name, "sha256": hash_api_key(token),
                            "tasks": sorted(set(args.task))})
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"added API key {args.name!r} for tasks {sorted(set(args.task))} to {path}; "
          "it is shown once:")
    print(token)
    return 0
