"""Chinese names in Chinese text: beside a cue word, or shown by the segmenter's words with no
cue; every span exactly the name; surname characters inside everyday words left alone; English
NER never trusted on CJK text."""

from __future__ import annotations

import json

import pytest

from harness.pii_corpus import score
from harness.zh_names import zh_name_corpus
from harness.zh_sentences import exact_scores, zh_handwritten
from tests.unit.masking.test_masking import REPORTS
from vllm_guard.masking.detection.chinese_names import ChineseNameDetector


@pytest.fixture(scope="module")
def corpora():
    return {"with_cue": zh_name_corpus(600, seed=3, cue_share=1.0),
            "without_cue": zh_name_corpus(150, seed=4, cue_share=0.0)}


@pytest.mark.parametrize("profile", ["default", "fast"])
def test_chinese_names_recall_and_precision(request, corpora, profile):
    det = request.getfixturevalue(f"{profile}_detector")
    report = {name: score(c, det.detect)["entities"]["PERSON"] for name, c in corpora.items()}
    report["all"] = score(corpora["with_cue"] + corpora["without_cue"],
                          det.detect)["entities"]["PERSON"]
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / f"zh_names_{profile}.json").write_text(json.dumps(report, indent=1))
    assert report["with_cue"]["recall"] >= 0.95, report
    assert report["all"]["precision"] >= 0.95, report
    # no cue: the segmenter's words (Faker's names; some given characters are verbs: 想, 刚)
    assert report["without_cue"]["recall"] >= 0.80, report


@pytest.mark.parametrize("profile", ["default", "fast"])
def test_handwritten_sentences_exact_spans(request, profile):
    """>= 50 sentences with names (no cue, role word before or after, 和 and 、) and >= 50
    traps; a span one character off counts as a miss and a false positive."""
    with_names, no_names = zh_handwritten()
    assert len(with_names) >= 50 and len(no_names) >= 50
    rep = exact_scores(request.getfixturevalue(f"{profile}_detector").detect)
    assert rep["recall"] >= 0.90, rep
    assert rep["precision"] >= 0.95, rep


@pytest.mark.parametrize("text, names", [
    # issue #34: the span ends on a word boundary, not one character past the name
    ("请联系客户王芳确认订单。", ["王芳"]),
    ("我的同事刘洋负责这个项目。", ["刘洋"]), ("经理吴敏同意了这个方案。", ["吴敏"]),
    ("黄蕾和马超下周出差。", ["黄蕾", "马超"]),
    ("彭磊、董洁和潘晓婷组成评审组。", ["彭磊", "董洁", "潘晓婷"]),
    ("这件事你问冯志强吧。", ["冯志强"]), ("下午罗敏会来取资料。", ["罗敏"]),
    ("用户张三的订单", ["张三"]), ("请转告王小明先生明天来", ["王小明"]),
    ("姓名：欧阳修远，身份证", ["欧阳修远"]), ("我叫李雷，想咨询", ["李雷"]),
    ("患者王秀英今日复诊", ["王秀英"]), ("联系人：刘娜 电话", ["刘娜"]),
    ("明天王经理来", []), ("客户服务中心", []), ("高兴地告诉大家", []), ("国家统计局", []),
    ("周末我们去吃李子。", []), ("黄金价格马上上涨。", []), ("他迷上了王者荣耀。", []),
])
def test_names_and_traps(text, names):
    assert [text[s.start:s.end] for s in ChineseNameDetector().detect(text)] == names


def test_cue_words_alone_without_the_segmenter():
    """segment=False: cue words only (what runs where jieba is not installed)."""
    det = ChineseNameDetector(segment=False)
    assert [s for s in det.detect("黄蕾和马超下周出差。")] == []
    text = "用户张三的订单"
    assert [text[s.start:s.end] for s in det.detect(text)] == ["张三"]


def test_english_ner_is_not_trusted_on_cjk_text(default_detector):
    det = default_detector
    text = "一样用户帖子也是出现都是。是一责任人员组织觉得科技这里。完全加入欢迎人民。"
    assert [s for s in det.detect(text) if s.entity in ("PERSON", "LOCATION")] == []
    mixed = "Meet Mary Smith and 客户李娜 today"
    got = {mixed[s.start:s.end] for s in det.detect(mixed) if s.entity == "PERSON"}
    assert {"李娜"} <= got and any("Mary Smith" in g for g in got)
