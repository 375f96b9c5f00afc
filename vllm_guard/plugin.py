"""vLLM general-plugin entry point (``vllm.general_plugins`` -> ``vllm_guard``).

vLLM calls :func:`register` once in every process it starts (API server, engine core,
worker). It must be idempotent and cheap; heavy imports happen lazily inside the hooks.
"""

from __future__ import annotations

import multiprocessing
import os

from vllm_guard import __version__, envs
from vllm_guard.log import ensure_handler, get_logger

logger = get_logger(__name__)
_registered = False


def process_role() -> str:
    """Name this process's role from vLLM's process title or the multiprocessing name."""
    title = ""
    try:
        import setproctitle

        title = setproctitle.getproctitle()
    except ImportError:
        pass
    name = multiprocessing.current_process().name
    for marker, role in (("EngineCore", "engine_core"), ("Worker", "worker"),
                         ("APIServer", "api_server")):
        if marker in title or marker in name:
            return role
    return "api_server" if name == "MainProcess" else name


def register() -> None:
    """Register vllm-guard's loader and ops with vLLM. Safe to call many times."""
    global _registered
    if _registered:
        return
    _registered = True
    from vllm_guard.loader import register_loader

    register_loader()
    if envs.get(envs.GRANTS):
        from vllm_guard.compat import check_vllm_version, installed_vllm_version
        from vllm_guard.kernels.layer import register_masked_layers

        check_vllm_version(installed_vllm_version())
        from vllm_guard.runtime.runner_hook import install_runner_hook

        register_masked_layers()
        install_runner_hook()
    ensure_handler()
    logger.info("vllm-guard %s registered in %s (pid %d)", __version__, process_role(),
                os.getpid())
