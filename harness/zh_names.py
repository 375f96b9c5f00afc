"""Chinese names in Chinese sentences (Faker zh_CN names), and sentences with no name, for
scoring the Chinese-name recognizer honestly: its surname list is its own, not Faker's."""

from __future__ import annotations

import random

from harness.pii_corpus import LabelledText, _build

WITH_CUE = [
    "客户{}的订单已经发货，请注意查收。",
    "{}先生您好，您的快递已到楼下。",
    "联系人：{}，电话13812345678。",
    "用户{}反馈说页面一直打不开。",
    "请转告{}女士明天上午来公司面试。",
    "姓名：{}，身份证号见附件。",
    "我叫{}，想咨询一下退款的问题。",
    "{}老师布置了新的作业。",
    "患者{}今日复诊，血压正常。",
    "收件人{}，地址北京市朝阳区建国路。",
    "麻烦把合同发给{}经理审核。",
    "会员{}的积分已过期。",
]
WITHOUT_CUE = ["昨天{}和我一起去吃饭了。", "这份报告是{}写的。"]
NO_NAME = [
    "客户服务中心的电话是多少？",
    "用户体验需要进一步提升。",
    "请联系我们的老师咨询课程。",
    "经理办公室在三楼。",
    "明天王经理不在，请改天再来。",
    "高兴地告诉大家，项目成功上线了。",
    "国家统计局发布了最新数据。",
    "患者需要按时服药。",
    "会员积分可以兑换礼品。",
    "收件人地址不能为空。",
    "姓名一栏请用正楷填写。",
    "我叫了一辆出租车去机场。",
    "时间安排在下周一上午九点。",
    "安全第一，预防为主。",
]


def zh_name_corpus(n: int = 600, seed: int = 0, cue_share: float = 0.85
                   ) -> list[LabelledText]:
    """``n`` sentences with one name each (``cue_share`` of them beside a cue word), then
    ``n // 3`` with none (template sentences without names and Faker paragraphs)."""
    from faker import Faker

    Faker.seed(seed)
    rng, fake = random.Random(seed), Faker("zh_CN")
    out = []
    for _ in range(n):
        template = rng.choice(WITH_CUE if rng.random() < cue_share else WITHOUT_CUE)
        before, after = template.split("{}")
        out.append(_build([before, ("PERSON", fake.name()), after], "zh"))
    for i in range(n // 3):
        text = rng.choice(NO_NAME) if i % 2 else fake.paragraph(nb_sentences=3)
        out.append(_build([text], "zh"))
    return out
