"""The vLLM arguments that serve the demo: one function, shared by ``vllm-guard demo`` and its
test, so the test serves exactly what a newcomer gets."""

from __future__ import annotations

import json

from vllm_guard.demo.build import DemoArtefacts

SERVED_MODEL_NAME = "demo"
MAX_MODEL_LEN = 64  # the suite model's max_position_embeddings (character-level tokens)


def vllm_args(art: DemoArtefacts, port: int, host: str = "127.0.0.1") -> list[str]:
    """Locked checkpoint, every task key loaded (requests get only what their API key grants),
    signature checked, small CPU footprint, loopback only."""
    return ["--model", str(art.locked), "--served-model-name", SERVED_MODEL_NAME,
            "--host", host, "--port", str(port),
            "--load-format", "secneuron",
            "--model-loader-extra-config", json.dumps(art.keys.loader_config(art.tasks)),
            "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
            "--gpu-memory-utilization", "0.1", "--max-num-seqs", "32"]
