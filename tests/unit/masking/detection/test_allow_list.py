"""The allow-list exempts exact detected values (case-insensitive), nothing else, and every
entry of a packaged config is a value the detectors find (the packaged ``example.com`` was
not: URLs and bare domains are not detected, and ``bob@example.com`` was masked)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from vllm_guard import configs
from vllm_guard.masking.config import MaskingConfig
from vllm_guard.masking.detection.detector import build_detector


def masked(cfg: MaskingConfig, text: str) -> list[str]:
    return [text[s.start:s.end] for s in build_detector(cfg).detect(text)]


def test_allow_list_entries_match_whole_values_case_insensitively():
    cfg = MaskingConfig(ner="off", allow_list=("bob@example.com", "example.org"))
    assert masked(cfg, "mail BOB@example.com or bob@example.com") == []
    assert masked(cfg, "mail alice@example.com") == ["alice@example.com"]
    assert masked(cfg, "mail alice@example.org") == ["alice@example.org"]  # not a domain rule


@pytest.mark.parametrize("name", [n for n in configs.names() if n.startswith("masking")])
def test_packaged_allow_list_entries_are_values_the_detectors_find(name):
    cfg = replace(MaskingConfig.load(configs.path(name)), ner="off", allow_list=())
    for entry in MaskingConfig.load(configs.path(name)).allow_list:
        assert masked(cfg, f"see {entry} today") == [entry], f"{name}: {entry!r} has no effect"
