"""Local fixture models and demo artefacts for tests, benchmarks and the demo."""

from vllm_guard.testing.fixtures import PRESETS, build_fixture, fixture_model, task_examples

__all__ = ["PRESETS", "build_fixture", "fixture_model", "task_examples"]
