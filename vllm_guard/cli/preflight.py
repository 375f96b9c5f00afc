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

from vllm_guard.cli.vllm_args import LOAD_CONFIG_FLAG, LOAD_FORMAT_FLAG, MODEL_FLAG, flag_value
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


def check_locked_checkpoint(model: str, args: Sequence[str]) -> frozenset[str]:
    """What ``--load-format secneuron`` would check before reading a weight: its options
    (unknown keys refused), the manifest's signature, version and signed files, and that
    every given key opens its task. Returns the checkpoint's task names."""
    from vllm_guard.secneuron.options import SecNeuronLoadConfig
    from vllm_guard.secneuron.preflight import open_for_serving

    root = Path(model).expanduser()
    if not root.is_dir():
        raise GuardError(f"--load-format secneuron needs a local model directory, got {model}")
    config = SecNeuronLoadConfig.from_extra(loader_extra(args))
    return frozenset(open_for_serving(root, config).manifest.tasks)


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


def check_before_exec(args: Sequence[str], grants: str | None) -> None:
    """Every check of a server's arguments that needs no vLLM. ``args`` is the vLLM argv
    (``--model`` resolved)."""
    model = flag_value(args, MODEL_FLAG)
    # (serve refuses a locked checkpoint without --load-format secneuron before this, and a
    # repeated or abbreviated --model/--load-format: vllm_args reads them as vLLM will)
    if model is not None and flag_value(args, LOAD_FORMAT_FLAG) == "secneuron":
        tasks = check_locked_checkpoint(model, args)
        if grants:
            check_grant_tasks(grants, tasks, model)
    check_port(args)
