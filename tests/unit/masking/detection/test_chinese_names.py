"""Chinese names in Chinese text: found beside a cue word, never guessed from a surname
character alone, and English NER never trusted on CJK text."""

from __future__ import annotations

import json

import pytest

from harness.pii_corpus import score
from harness.zh_names import zh_name_corpus
from tests.unit.masking.test_masking import REPORTS
from vllm_guard.masking.config import MaskingConfig
from vllm_guard.masking.detection.chinese_names import ChineseNameDetector
from vllm_guard.masking.detection.detector import build_detector


@pytest.fixture(scope="module")
def corpora():
    return {"with_cue": zh_name_corpus(600, seed=3, cue_share=1.0),
            "without_cue": zh_name_corpus(150, seed=4, cue_share=0.0)}


@pytest.mark.parametrize("profile", ["default", "fast"])
def test_chinese_names_recall_and_precision(corpora, profile):
    det = build_detector(MaskingConfig(ner="off") if profile == "fast" else MaskingConfig())
    report = {name: score(c, det.detect)["entities"]["PERSON"] for name, c in corpora.items()}
    report["all"] = score(corpora["with_cue"] + corpora["without_cue"],
                          det.detect)["entities"]["PERSON"]
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / f"zh_names_{profile}.json").write_text(json.dumps(report, indent=1))
    assert report["with_cue"]["recall"] >= 0.95, report
    assert report["all"]["precision"] >= 0.95, report
    # no cue, no claim: a surname character alone is too often a word (see the module)
    assert report["without_cue"]["recall"] < 0.1, report


@pytest.mark.parametrize("text, names", [
    ("用户张三的订单", ["张三"]), ("请转告王小明先生明天来", ["王小明"]),
    ("姓名：欧阳修远，身份证", ["欧阳修远"]), ("我叫李雷，想咨询", ["李雷"]),
    ("患者王秀英今日复诊", ["王秀英"]), ("联系人：刘娜 电话", ["刘娜"]),
    ("明天王经理来", []), ("客户服务中心", []), ("高兴地告诉大家", []), ("国家统计局", []),
])
def test_cue_words_and_common_words(text, names):
    assert [text[s.start:s.end] for s in ChineseNameDetector().detect(text)] == names


def test_english_ner_is_not_trusted_on_cjk_text():
    det = build_detector(MaskingConfig())
    text = "一样用户帖子也是出现都是。是一责任人员组织觉得科技这里。完全加入欢迎人民。"
    assert [s for s in det.detect(text) if s.entity in ("PERSON", "LOCATION")] == []
    mixed = "Meet Mary Smith and 客户李娜 today"
    got = {mixed[s.start:s.end] for s in det.detect(mixed) if s.entity == "PERSON"}
    assert {"李娜"} <= got and any("Mary Smith" in g for g in got)
