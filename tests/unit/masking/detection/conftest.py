"""Detectors shared by the detection tests of one session: building one loads spaCy, the
name lists and jieba's dictionary (seconds), once."""

from __future__ import annotations

import pytest

from vllm_guard.masking.config import MaskingConfig
from vllm_guard.masking.detection.detector import build_detector


@pytest.fixture(scope="session")
def default_detector():
    return build_detector(MaskingConfig(detector_workers=0))


@pytest.fixture(scope="session")
def fast_detector():
    return build_detector(MaskingConfig(ner="off", detector_workers=0))
