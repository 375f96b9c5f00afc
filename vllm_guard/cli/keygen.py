"""``vllm-guard keygen``: a 256-bit task key, or the publisher's Ed25519 signing key."""

from __future__ import annotations

import argparse

from vllm_guard.cli.commands import add_parser
from vllm_guard.errors import GuardError


def register(sub: argparse._SubParsersAction) -> None:
    s = add_parser(sub, "keygen")
    s.add_argument("--task")
    s.add_argument("--out")
    s.add_argument("--signing", action="store_true", help="publisher Ed25519 key pair instead")
    s.add_argument("--print-key", action="store_true", help="also print the key (careful)")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vllm_guard.secneuron.keys import TaskKey, generate_signing_key, save_task_key

    if args.signing:
        priv, pub = generate_signing_key(args.out or "publisher.pem")
        print(f"wrote Ed25519 signing key {priv} (mode 0600) and public key {pub}")
        return 0
    if not args.task:
        raise GuardError("keygen needs --task NAME (or --signing for a publisher key)")
    key = TaskKey.generate(args.task)
    path = save_task_key(key, args.out or f"{args.task}.key")
    print(f"wrote task key for {key.task!r} (key id {key.key_id}) to {path} (mode 0600)")
    if args.print_key:
        print(key.to_json())
    return 0
