"""``vllm-guard demo``: build (or reuse) the demo model and serve it on 127.0.0.1.

The locked model is served with every task key loaded, per-request grants from two API
keys (one task; every task) and placeholder masking; the API keys are printed with ready
``curl`` commands. Other arguments go to vLLM unchanged.
"""

from __future__ import annotations

import argparse

from vllm_guard.cli.commands import add_parser


def register(sub: argparse._SubParsersAction) -> None:
    s = add_parser(sub, "demo",
                   description="Build (or reuse) the demo model and serve it on 127.0.0.1.")
    s.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default 8000)")
    s.add_argument("--no-serve", action="store_true",
                   help="build (or reuse) the demo and print the API keys and curl commands, "
                   "without starting the server")
    s.set_defaults(func=run, forwards_unknown=True)


def run(args: argparse.Namespace) -> int:
    from vllm_guard.cli.serve import exec_server
    from vllm_guard.demo.build import demo_artefacts
    from vllm_guard.demo.guide import guide
    from vllm_guard.demo.serving import vllm_args

    art = demo_artefacts(progress=lambda line: print(line, flush=True))
    print(guide(art, args.port), flush=True)
    if args.no_serve:
        return 0
    exec_server([*vllm_args(art, args.port), *args.vllm_args], grants=str(art.grants),
                masking=str(art.masking))
    return 0
