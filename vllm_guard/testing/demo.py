"""Demo artefacts: the fixture model served by ``vllm-guard demo``."""

from __future__ import annotations

from vllm_guard.testing.fixtures import fixture_model


def demo_server_args(port: int) -> list[str]:
    """vLLM arguments that serve the demo model on loopback."""
    model = fixture_model("tiny")
    return ["--model", str(model), "--served-model-name", "demo", "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "float32", "--max-model-len", "512",
            "--enforce-eager", "--gpu-memory-utilization", "0.1"]
