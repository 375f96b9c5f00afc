"""``vllm-guard keygen``: a 256-bit task key, or the publisher's Ed25519 signing key."""

from __future__ import annotations

import argparse
from pathlib import Path

from vllm_guard.cli.commands import add_parser
from vllm_guard.errors import GuardError


def register(sub: argparse._SubParsersAction) -> None:
    s = add_parser(sub, "keygen")
    s.add_argument("--task", help="the task the key opens (e.g. add)")
    s.add_argument("--out", help="key file to write (default TASK.key, or publisher.pem with "
                   "--signing, its public key beside it as publisher.pub)")
    s.add_argument("--signing", action="store_true", help="publisher Ed25519 key pair instead")
    s.add_argument("--print-key", action="store_true", help="also print the key (careful)")
    s.add_argument("--force", action="store_true",
                   help="replace existing key files (the old key is gone for good)")
    s.set_defaults(func=run)


def refuse_overwrite(paths: list[Path], force: bool) -> None:
    """An existing key may be the only one that opens a locked checkpoint: keep it."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise GuardError(f"refusing to overwrite {', '.join(existing)}: an existing key may be "
                         "the only one that opens a locked checkpoint (--force replaces it)")


def run(args: argparse.Namespace) -> int:
    from vllm_guard.secneuron.keys import TaskKey, generate_signing_key, save_task_key

    if args.signing:
        out = Path(args.out or "publisher.pem")
        refuse_overwrite([out, out.with_suffix(".pub")], args.force)
        priv, pub = generate_signing_key(out)
        print(f"wrote Ed25519 signing key {priv} (mode 0600) and public key {pub}")
        return 0
    if not args.task:
        raise GuardError("keygen needs --task NAME (or --signing for a publisher key)")
    out = Path(args.out or f"{args.task}.key")
    refuse_overwrite([out], args.force)
    key = TaskKey.generate(args.task)
    path = save_task_key(key, out)
    print(f"wrote task key for {key.task!r} (key id {key.key_id}) to {path} (mode 0600)")
    if args.print_key:
        print(key.to_json())
    return 0
