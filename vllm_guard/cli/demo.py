"""``vllm-guard demo``: build (or reuse) the demo model and serve it on 127.0.0.1."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("demo", help="build the demo model and serve it on 127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.set_defaults(func=run, forwards_unknown=True)


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("being rebuilt on vllm_guard.demo")
