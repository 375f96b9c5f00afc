"""Logging: vllm-guard loggers are children of vLLM's ``vllm`` logger and share its handler.

vLLM configures its logger lazily; a plugin can be registered before that (the API server
loads plugins while parsing arguments). Then our logger gets a handler of its own so the
registration line is never lost.
"""

import logging
import os

ROOT = "vllm.vllm_guard"


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"{ROOT}.{name.removeprefix('vllm_guard.')}")


def ensure_handler() -> None:
    vllm_logger, ours = logging.getLogger("vllm"), logging.getLogger(ROOT)
    if vllm_logger.handlers or ours.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(
        f"(pid={os.getpid()}) %(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s",
        "%m-%d %H:%M:%S"))
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
