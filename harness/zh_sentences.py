"""Hand-written Chinese sentences for the Chinese-name recognizer (issue #34): names in
varied positions (no cue word, a role word before or after, two names joined by 和 or 、),
and traps with no name (surname characters that start everyday words, brands, places, games).

Names are marked ``[...]`` in the source; :func:`zh_handwritten` returns labelled texts.
Written by hand, not from the recognizer's lists: a measure, not a fit.
"""

from __future__ import annotations

import re

from harness.pii_corpus import LabelledText, _build

WITH_NAMES = (
    # no cue word
    "[黄蕾]和[马超]下周出差。",
    "[刘洋]负责这个项目。",
    "昨天[陈静]没来上班。",
    "这份报告是[周婷]写的。",
    "[孙浩然]已经把合同寄出去了。",
    "我刚和[林晓燕]通过电话。",
    "会议由[赵磊]主持。",
    "请把发票交给[何佳怡]。",
    "[郭子豪]说他明天请假。",
    "下午[罗敏]会来取资料。",
    "[韩雪]和我是大学同学。",
    "这件事你问[冯志强]吧。",
    "[曹宇航]的航班晚点了。",
    "[唐嘉欣]提交了离职申请。",
    "[欧阳娜娜]今晚有演出。",
    "[许文博]把钥匙落在会议室了。",
    "周一早上[邓丽君]的歌在广播里播放。",
    "[蒋芳]昨天已经付款。",
    "我们等[谢天明]回来再讨论。",
    "[宋佳]刚刚发来了新版本。",
    "[范冰冰]出席了发布会。",
    "[彭磊]、[董洁]和[潘晓婷]组成评审组。",
    "[杨帆]、[朱琳]负责接待。",
    "[胡歌]和[袁泉]都确认参加。",
    "快递员把包裹交给了[钟雨桐]。",
    "[叶子涵]每天早上跑步。",
    "听说[程浩]要调到上海。",
    "[魏晨]把报销单填错了。",
    "麻烦[吕思远]核对一下库存。",
    "[丁一凡]的电脑坏了。",
    # a role word before
    "请联系客户[王芳]确认订单。",
    "我的同事[刘洋]负责这个项目。",
    "经理[吴敏]同意了这个方案。",
    "老板[沈立军]今天不在。",
    "病人[林晓东]需要复查。",
    "主管[姚倩]批准了请假。",
    "司机[贾国庆]已经到楼下。",
    "护士[崔婷婷]给他量了体温。",
    "我的朋友[夏雨]推荐了这家餐厅。",
    "联系人[田野]的电话打不通。",
    "新来的实习生[邹凯]很认真。",
    "律师[陆振华]起草了协议。",
    "我表哥[江涛]在北京工作。",
    "班主任[孟凡]通知家长开会。",
    "房东[侯建国]要求提前交租。",
    # a role word after
    "[张伟]先生已经到了。",
    "[孙丽]女士请到前台登记。",
    "[高峰]经理明天出差。",
    "[郑浩]老师布置了作业。",
    "[马晓明]医生今天值班。",
    "[秦岚]主任在开会。",
    "请[白杨]同学到办公室来。",
    "[万晓]总监审批了预算。",
    # labelled fields
    "姓名：[郑浩]，电话请见附件。",
    "收件人：[卢静怡]，地址见订单。",
    "申请人[石磊]提交了材料。",
    # mixed positions, two names
    "[王强]把文件转给了客户[李梅]。",
    "[赵敏]的女儿[赵小雨]今年上小学。",
    "经理[韦东]和[黎明辉]一起去了展会。",
    "明天[于洋]和[任静]值班。",
)

NO_NAMES = (
    "周末我们去郊区爬山。",
    "超市里的李子很新鲜。",
    "黄金价格今天又上涨了。",
    "我马上就到。",
    "他最近迷上了王者荣耀。",
    "明天下午开会。",
    "高兴地告诉大家，项目成功上线了。",
    "国家统计局发布了最新数据。",
    "这个方法很方便。",
    "安全第一，预防为主。",
    "文件已经上传到系统。",
    "请把成本控制在预算以内。",
    "时间安排在下周一上午九点。",
    "金额不能超过一万元。",
    "关于这个问题我们再讨论。",
    "司机师傅请在路口停车。",
    "包装盒里少了一个零件。",
    "公司的管理制度需要更新。",
    "请通过邮件提交申请。",
    "江湖上的传说不可信。",
    "石油价格下跌了。",
    "路上堵车，我晚点到。",
    "车站离这里不远。",
    "常见问题请看帮助页面。",
    "万一下雨就取消活动。",
    "这款手机的屏幕很清晰。",
    "华为发布了新款手机。",
    "小米的销量增长很快。",
    "我们在杭州西湖边散步。",
    "长城是中国的名胜古迹。",
    "黄山的风景很美。",
    "武汉大学今年扩招了。",
    "温度明天会降到五度。",
    "文化交流促进了相互理解。",
    "和平与发展是时代主题。",
    "这道菜的味道很好。",
    "宁可慢一点也要做对。",
    "明白了，我会尽快处理。",
    "阳光照进了房间。",
    "高峰时段地铁很拥挤。",
    "冷笑话让大家都笑了。",
    "他有很多古老的硬币。",
    "叶子变黄了，秋天来了。",
    "胡萝卜对眼睛有好处。",
    "白领的工作压力很大。",
    "金融市场波动加剧。",
    "余额不足，请及时充值。",
    "任何人都不能例外。",
    "平时多喝水有好处。",
    "向左转就能看到银行。",
    "周围的环境很安静。",
    "程序员正在修复漏洞。",
    "信用卡账单已经出来了。",
    "于是我们决定改期。",
    "全体员工下午三点集合。",
    "高铁票已经售罄。",
    "康复训练需要坚持。",
    "谢谢你的帮助。",
)

_MARK = re.compile(r"\[([^\]]+)\]")


def _labelled(sentence: str) -> LabelledText:
    parts: list[str | tuple[str, str]] = []
    pos = 0
    for m in _MARK.finditer(sentence):
        parts += [sentence[pos:m.start()], ("PERSON", m.group(1))]
        pos = m.end()
    parts.append(sentence[pos:])
    return _build(parts, "zh")


def zh_handwritten() -> tuple[list[LabelledText], list[LabelledText]]:
    """(sentences with names, sentences with none)."""
    return [_labelled(s) for s in WITH_NAMES], [_labelled(s) for s in NO_NAMES]


def exact_scores(detect) -> dict:  # noqa: ANN001 - any callable of a text
    """PERSON recall and precision on the hand-written sentences, spans matched exactly (one
    character off is a miss and a false positive), and the sentences got wrong."""
    with_names, no_names = zh_handwritten()
    gold = found = predicted = 0
    wrong: list[tuple[str, list[str]]] = []
    for ex in with_names + no_names:
        got = {(s.start, s.end) for s in detect(ex.text) if s.entity == "PERSON"}
        want = {(a, b) for a, b, _ in ex.spans}
        gold, found, predicted = gold + len(want), found + len(got & want), predicted + len(got)
        if got != want:
            wrong.append((ex.text, [ex.text[a:b] for a, b in sorted(got)]))
    return {"sentences_with_names": len(with_names), "sentences_without": len(no_names),
            "names": gold, "recall": found / gold,
            "precision": found / predicted if predicted else 0.0, "wrong": wrong}
