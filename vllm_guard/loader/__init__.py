"""vLLM model loader for SecNeuron-locked checkpoints (``--load-format secneuron``)."""


def register_loader() -> None:
    """Make ``--load-format secneuron`` available (imports vLLM lazily)."""
    from vllm_guard.loader.secneuron_loader import register_secneuron_loader

    register_secneuron_loader()
