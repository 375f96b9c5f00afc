"""Checks ``vllm-guard serve`` runs before it execs vLLM, each a one-line error.

Inside vLLM the same mistakes (a typo in ``--model-loader-extra-config``, a wrong task key, a
busy port) surface after 10-45 s as the right line followed by four tracebacks ending in
``RuntimeError: Engine core initialization failed``. The loader checks run the loader's own
code (:mod:`vllm_guard.secneuron.preflight`, torch-free), so the two cannot disagree; the
loader runs them again in the engine.
"""

from __future__ import annotations

import errno
import json
import socket
from collections.abc import Sequence
from pathlib import Path

from vllm_guard.cli.vllm_args import (
    LOAD_CONFIG_FLAG,
    LOAD_FORMAT_FLAG,
    MODEL_FILE_FLAGS,
    MODEL_FLAG,
    check_unambiguous,
    flag_value,
    with_flag,
)
from vllm_guard.errors import GuardError

VLLM_DEFAULT_PORT = 8000


def loader_extra(args: Sequence[str]) -> dict:
    """``--model-loader-extra-config`` as vLLM parses it (JSON), or {} when absent."""
    raw = flag_value(args, LOAD_CONFIG_FLAG)
    if raw is None:
        return {}
    try:
        extra = json.loads(raw)
    except ValueError as e:
        raise GuardError(f"{LOAD_CONFIG_FLAG} is not valid JSON: {e}") from None
    if not isinstance(extra, dict):
        raise GuardError(f"{LOAD_CONFIG_FLAG} must be a JSON object, got {raw!r}")
    return extra


def check_model_file_flags(args: Sequence[str], root: Path) -> None:
    """vLLM may read a model's config, tokenizer or generation config from elsewhere than
    ``--model``; for a locked checkpoint those are signed with it, so only the checkpoint
    itself may be named (serve then points the flag at the checked copy)."""
    check_unambiguous(args, MODEL_FILE_FLAGS)
    for flag in MODEL_FILE_FLAGS:
        value = flag_value(args, flag)
        if value is None or (flag == "--generation-config" and value in ("auto", "vllm")):
            continue
        if Path(value).expanduser().resolve() != root:
            raise GuardError(f"{flag} {value}: a locked checkpoint's config and tokenizer files "
                             f"are signed with it; vLLM reads them from {root} as checked "
                             f"(drop {flag})")


def check_locked_checkpoint(model: str, args: Sequence[str]) -> tuple[frozenset[str],
                                                                        list[str]]:
    """What ``--load-format secneuron`` would check before reading a weight: its options
    (unknown keys refused), the manifest's signature, version and signed files, and that
    every given key opens its task. The side files are copied as they are hashed into a
    private directory (:mod:`vllm_guard.cli.staging`) that vLLM is then pointed at: it reads
    only the bytes checked here, whatever happens to the checkpoint afterwards; the loader
    reads the weights from the checkpoint, named by its option ``checkpoint``.

    Returns the checkpoint's task names and the vLLM argv pointing at the copy."""
    from vllm_guard.cli import staging
    from vllm_guard.secneuron.options import SecNeuronLoadConfig
    from vllm_guard.secneuron.preflight import open_for_serving

    root = Path(model).expanduser()
    if not root.is_dir():
        raise GuardError(f"--load-format secneuron needs a local model directory, got {model}")
    extra = loader_extra(args)
    if "checkpoint" in extra:
        raise GuardError(f"secneuron loader option 'checkpoint' is set by vllm-guard serve: "
                         f"give the checkpoint directory as MODEL (remove it from "
                         f"{LOAD_CONFIG_FLAG})")
    config = SecNeuronLoadConfig.from_extra(extra)
    root = root.resolve()
    check_model_file_flags(args, root)
    staged = staging.claim(root)
    try:
        opened = open_for_serving(root, config, stage_to=staged.path)
    except BaseException:
        staged.close()
        raise
    copy = str(staged.path)
    out = with_flag(args, MODEL_FLAG, copy)
    for flag in MODEL_FILE_FLAGS:  # only the checkpoint itself is left here: its copy
        if flag_value(out, flag) not in (None, "auto", "vllm"):
            out = with_flag(out, flag, copy)
    out = with_flag(out, LOAD_CONFIG_FLAG, json.dumps({**extra, "checkpoint": str(root)}))
    if flag_value(out, LOAD_CONFIG_FLAG) is None:
        out += [LOAD_CONFIG_FLAG, json.dumps({"checkpoint": str(root)})]
    if flag_value(out, "--served-model-name") is None:
        out = ["--served-model-name", model, *out]  # vLLM's default: --model as given
    return frozenset(opened.manifest.tasks), out


def check_grant_tasks(grants: str, tasks: frozenset[str], model: str) -> None:
    """A grant naming a task the checkpoint lacks would silently get public-only answers."""
    from vllm_guard.grants.credentials import GrantsConfig

    config = GrantsConfig.load(grants)
    for name, granted in [*((f"API key {k.name!r}", k.tasks) for k in config.api_keys),
                          ("'tasks'", config.known_tasks or frozenset())]:
        unknown = sorted(granted - tasks)
        if unknown:
            raise GuardError(f"grants file {grants}: {name} names task(s) {unknown} that "
                             f"{model} does not have (its tasks: {sorted(tasks)})")


def check_port(args: Sequence[str]) -> None:
    """Bind the address vLLM will listen on, briefly (as vLLM does: SO_REUSEADDR), so a busy
    port is one line now rather than an OSError traceback after the model has loaded."""
    if flag_value(args, "--uds") is not None:
        return
    host = flag_value(args, "--host") or ""
    port_text = flag_value(args, "--port")
    try:
        port = int(port_text) if port_text is not None else VLLM_DEFAULT_PORT
    except ValueError:
        return  # vLLM's own parser names the bad value
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            where = f"{host or '*'}:{port}"
            if e.errno == errno.EADDRINUSE:
                raise GuardError(f"port {where} is already in use (another server?): choose "
                                 "another with --port") from None
            raise GuardError(f"cannot listen on {where}: {e.strerror or e}") from None


def check_before_exec(args: Sequence[str], grants: str | None) -> list[str]:
    """Every check of a server's arguments that needs no vLLM. ``args`` is the vLLM argv
    (``--model`` resolved); returns the argv to exec (for a locked checkpoint, pointing at
    the checked copy of its side files)."""
    model = flag_value(args, MODEL_FLAG)
    out = list(args)
    # (serve refuses a locked checkpoint without --load-format secneuron before this, and a
    # repeated or abbreviated --model/--load-format: vllm_args reads them as vLLM will)
    if model is not None and flag_value(args, LOAD_FORMAT_FLAG) == "secneuron":
        tasks, out = check_locked_checkpoint(model, args)
        if grants:
            check_grant_tasks(grants, tasks, model)
    check_port(args)
    return out
