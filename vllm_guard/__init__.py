"""vllm-guard: runtime abuse and privacy controls inside the vLLM inference server."""

__version__ = "0.1.0"
