"""``vllm-guard rotate``: revoke a task key (re-encrypt) or re-wrap a lost one."""

from __future__ import annotations

import argparse

from vllm_guard.cli.commands import add_parser
from vllm_guard.cli.common import load_keys
from vllm_guard.errors import GuardError


def register(sub: argparse._SubParsersAction) -> None:
    s = add_parser(sub, "rotate")
    s.add_argument("--model", required=True,
                   help="locked checkpoint directory (replaced atomically)")
    s.add_argument("--revoke", metavar="TASK", help="revoke TASK's current key: fresh data "
                   "keys, its groups re-encrypted in place, re-signed")
    s.add_argument("--task", help="re-wrap TASK's data keys from --old to --new")
    s.add_argument("--old", metavar="KEYFILE", help="the task's current key (with --revoke: "
                   "only needed to keep groups no other task opens)")
    s.add_argument("--new", metavar="KEYFILE", help="the task's new key (with --revoke: "
                   "optional; without it the task loses access)")
    s.add_argument("--key", action="append", default=[], metavar="KEYFILE",
                   help="with --revoke: current keys of the other tasks (repeatable)")
    s.add_argument("--signing-key", help="publisher Ed25519 key: the manifest is re-signed")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vllm_guard.secneuron.keys import load_signing_key, load_task_key
    from vllm_guard.secneuron.rekey import revoke_task, rotate_task_key

    signer = load_signing_key(args.signing_key) if args.signing_key else None
    if (args.task is None) == (args.revoke is None):
        raise GuardError("rotate needs --task TASK --old KEY --new KEY (re-wrap a lost key; "
                         "does not revoke) or --revoke TASK (re-encrypt; the old key opens "
                         "nothing)")
    if args.revoke is None:
        if not args.old or not args.new or args.key:
            raise GuardError("rotate --task needs --old KEYFILE and --new KEYFILE (and no --key)")
        old, new = load_task_key(args.old), load_task_key(args.new)
        if old.task != args.task:
            raise GuardError(f"--old key is for task {old.task!r}, not {args.task!r}")
        n = rotate_task_key(args.model, old, new, signer)
        print(f"re-wrapped {n} data keys of task {args.task!r} under key id {new.key_id} "
              "(same data keys and ciphertext: this does not revoke the old key; use "
              "--revoke for that)")
        return 0
    if signer is None:
        raise GuardError("rotate --revoke re-encrypts and re-signs: give the publisher's "
                         "signing key (--signing-key FILE)")
    keys = load_keys(args.key)
    if args.old:
        old = load_task_key(args.old)
        if old.task != args.revoke:
            raise GuardError(f"--old key is for task {old.task!r}, not {args.revoke!r}")
        keys[old.task] = old
    new = load_task_key(args.new) if args.new else None
    rep = revoke_task(args.model, args.revoke, keys, signer, new)
    lost = f" (groups {list(rep.dropped)} can no longer be opened)" if rep.dropped else ""
    fate = f"now opened by its new key {new.key_id}" if new else f"dropped{lost}"
    print(f"revoked the key of task {rep.task!r}: {len(rep.groups)} groups re-encrypted under "
          f"fresh data keys in {list(rep.files)}; its access is {fate}; checkpoint version "
          f"{rep.version}")
    return 0
