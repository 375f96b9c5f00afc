"""``vllm-guard lock``: encrypt the selected neurons into a signed locked checkpoint."""

from __future__ import annotations

import argparse

from vllm_guard.cli.commands import add_parser
from vllm_guard.cli.common import load_keys
from vllm_guard.errors import GuardError


def register(sub: argparse._SubParsersAction) -> None:
    s = add_parser(sub, "lock")
    s.add_argument("--model", required=True, help="plaintext model directory (safetensors)")
    s.add_argument("--selection", required=True,
                   help="neuron selection from extract (or train-locks' lock_selection.json)")
    s.add_argument("--key", action="append", required=True, metavar="TASK=KEYFILE",
                   help="each selected task's key from keygen (repeatable)")
    s.add_argument("--signing-key", help="publisher Ed25519 key (keygen --signing): signs "
                   "the manifest")
    s.add_argument("--unsigned", action="store_true",
                   help="write an unsigned manifest (servers then need allow_unsigned)")
    s.add_argument("--chunk-kib", type=int, default=1024,
                   help="AES-GCM chunk size in KiB (default 1024)")
    s.add_argument("--out", required=True, help="locked checkpoint directory to write")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vllm_guard.secneuron.keys import load_signing_key
    from vllm_guard.secneuron.lock import lock_checkpoint
    from vllm_guard.secneuron.selection import Selection

    if not args.signing_key and not args.unsigned:
        raise GuardError("lock needs --signing-key FILE (or --unsigned, not recommended)")
    signer = load_signing_key(args.signing_key) if args.signing_key else None
    manifest = lock_checkpoint(args.model, Selection.load(args.selection), load_keys(args.key),
                               args.out, signer, chunk_bytes=args.chunk_kib * 1024)
    print(f"locked {len(manifest.groups)} groups for tasks {sorted(manifest.tasks)} "
          f"into {args.out} (version {manifest.version}, {len(manifest.files)} files hashed, "
          f"{'signed' if signer else 'UNSIGNED'})")
    return 0
