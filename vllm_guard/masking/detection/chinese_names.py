"""Chinese personal names in CJK text: a common surname and a one- or two-character given
name. spaCy's English model cannot read CJK and the US name lists do not hold these names.

Two sources of evidence, combined:
- a cue next to the name (用户张三, 张三先生, 姓名：张三);
- the words of the sentence, from a segmenter (:mod:`.zh_segment`, jieba): a word no
  dictionary holds that starts with a surname (黄蕾, 林晓燕: jieba's HMM joins unknown
  names into one word), a rare dictionary name (马超), or a lone surname character before a
  one- or two-character word (孙/浩然, 陆/振华).

A surname character is often an ordinary word (高兴, 王国, 明天, 李子, 阳光), so the guards
stay: common words, characters that never end a name, surname characters that are everyday
words on their own (和, 高, 钱). Every span ends on a word boundary of the segmenter, never a
character past the name (客户王芳确认: 王芳). Measured on hand-written sentences
(``harness/zh_sentences.py``) in ``tests/unit/masking/detection/test_chinese_names.py``.
"""

from __future__ import annotations

import re

from vllm_guard.masking.detection.zh_segment import Segmenter, Token, segmenter
from vllm_guard.masking.types import Detector, Span

# Common single-character surnames (about 95% of the population) and compound surnames.
SURNAMES = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程"
    "苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付傅方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛"
    "郝龚邵万钱严覃武戴莫孔向汤常温康施文牛樊葛邢安齐易乔伍庞颜倪庄聂章鲁岳翟殷詹申欧耿关兰焦"
    "俞左柳甘祝包宁尚符舒阮柯纪梅童凌毕单季裴霍涂成苗谷盛曲翁冉骆蓝路游辛靳管柴蒙鲍华喻祁蒲房"
    "滕屈饶解牟艾尤阳时穆农司卓古吉缪简车项连芦麦褚娄窦戚岑景党宫费卜冷晏席卫米柏宗瞿桂全佟应"
    "臧闵苟邬边卞姬师和仇栾隋商刁沙荣巫寇桑郎甄丛仲虞敖巩明佘池查麻苑迟邝官封谈匡鞠惠荆乐冀郁"
    "胥南班储原栗燕楚鄢劳谌奚皮粟冼蔺楼盘满闻位厉伊仝区郜海阚花权强帅屠豆朴盖练廉禹井祖漆巴丰"
    "支卿国狄平计索宣晋相初门云容敬来扈晁芮都普阙浦戈伏鹿薄邸雍辜羊母裘亓修邰赫杭况那宿鲜印逯"
    "隆茹诸战慎危玉银亢嵇湛宾戎勾茅利於居揭干但尉冶斯元束檀衣信展阴昝智幸奉植衡富尧闭由")
COMPOUND_SURNAMES = ("欧阳", "司马", "上官", "诸葛", "东方", "皇甫", "尉迟", "公孙", "慕容",
                     "令狐", "长孙", "宇文", "司徒", "夏侯", "轩辕", "端木", "独孤", "南宫",
                     "西门", "百里", "呼延", "钟离", "闻人", "赫连", "澹台", "公羊", "太史")
TITLES = ("先生", "女士", "小姐", "老师", "经理", "总监", "主任", "医生", "大夫", "教授",
          "律师", "同学", "师傅", "阿姨", "叔叔", "博士", "院士", "同志", "夫人", "部长",
          "局长", "处长", "科长", "董事长", "总经理", "校长", "护士", "女儿", "儿子", "同事")
CUES = ("客户", "用户", "顾客", "患者", "病人", "员工", "会员", "学生", "联系人", "收件人",
        "收货人", "寄件人", "持卡人", "申请人", "负责人", "经办人", "乘客", "租客", "房东",
        "业主", "老板", "姓名", "名字", "我叫", "名叫", "叫做", "本人", "家长", "法人",
        "被保险人", "投保人", "借款人", "担保人", "受益人", "开户人", "户主")
# Characters that end a name: function words and common verbs right after a name.
_NOT_GIVEN = set("的了在是和与及或说等已将也都就还又要想去来到把被给对向从为让请您你我他她它们"
                 "这那有没不很才再先女士生老师经理同学今昨反刚正买打问会能上下里写看做吃拿带送找讲")
_CJK = "\u3400-\u4dbf\u4e00-\u9fff"
_SURNAME = "|".join([*COMPOUND_SURNAMES, f"[{SURNAMES}]"])
_TITLE = "|".join(sorted(TITLES, key=len, reverse=True))
_CUE = "|".join(sorted(CUES, key=len, reverse=True))
# cue + name: the given name is one or two CJK characters (trimmed below)
_AFTER_CUE = re.compile(rf"(?:{_CUE})[：:\s]*(?P<name>(?:{_SURNAME})[{_CJK}]{{1,2}})")
# name + title: a one- or two-character given name right before the title
# (the name starts the text, follows a non-CJK character or a word that often precedes one)
_LEFT = "请告诉给和与跟问找致向是对让叫把被由将约见到"
# Common words that begin with a surname character: never the start of a name.
_WORDS = frozenset((
    "明天", "今天", "时间", "时候", "高兴", "王国", "文件", "文化", "安全",
    "成功", "国家", "国内", "和平", "平安", "平时", "信息", "海关", "全部",
    "全体", "公司", "方面", "方便", "同时", "来自", "由于", "关于", "通过",
    "向来", "和谐", "元旦", "明白", "明显", "黄金", "金额", "程序", "程度",
    "江湖", "石油", "路上", "车辆", "车站", "成本", "成为", "应该", "应用",
    "常用", "常见", "万一", "司机", "包括", "包装", "管理", "华人", "周末",
    "周围", "关系", "关注", "关心", "成绩", "成员", "安排", "文章", "信用",
    "金融", "高级", "高度", "方法", "方式", "华丽", "常规",
))
_BEFORE_TITLE = re.compile(rf"(?:(?<![{_CJK}])|(?<=[{_LEFT}]))(?P<name>(?:{_SURNAME})"
                           rf"[{_CJK}]{{1,2}}?)(?:{_TITLE})")


# Surname characters that, standing alone between words, are nearly always a word of their
# own (和 and, 高 tall, 钱 money, 向 towards): no split name starts with one without a cue.
_SOLO_WORDS = set("和都来那但于时由向高成门米国万曾元路应区南党段连全相干钱强原任边位明金初"
                  "方常左花白官师平管信石文车海满龙居战安项古余史权游皮关封谈诸房宫云牛楼章"
                  "修银解单尚包司利冷玉易计巴支闻班齐奉华练盖斯于伊区盘满位厉井祖漆丰卿国"
                  "平计索宣晋相初门云容敬来都普浦伏鹿薄母修那宿鲜印隆诸战慎危玉银亢宾但"
                  "信展阴智幸奉富由南原花权强帅豆盖练廉禹巴支")
# what makes the word before a place or a firm (白井市, 吉田食品有限会社, 有限会社田中水産)
_PLACE_SUFFIX = set("市县区镇村乡省路街町郡州道")
_FIRM_WORDS = frozenset(("公司", "集团", "有限", "食品", "水产", "水産", "银行", "大学", "学院",
                         "医院", "科技", "股份", "实业", "商店", "超市", "酒店", "饭店", "工厂",
                         "会社", "商事", "株式", "产业", "电器", "汽车", "药业", "书店"))
_HAS_CJK = re.compile(f"[{_CJK}]")
_ALL_CJK = re.compile(f"[{_CJK}]+")


class ChineseNameDetector(Detector):
    """PERSON spans for Chinese names: beside a cue, or by the segmenter's words."""

    def __init__(self, score: float = 0.85, segment: bool = True):
        self.score = score
        self.segment = segment

    def detect(self, text: str) -> list[Span]:
        if not _HAS_CJK.search(text):
            return []
        seg = segmenter() if self.segment else None
        cues = list(_AFTER_CUE.finditer(text))
        tokens = _tokens(text, seg, [m.start("name") for m in cues]) if seg is not None else []
        bounds = {t.end for t in tokens}
        spans: dict[tuple[int, int], Span] = {}
        for m in cues:
            start, end = m.span("name")
            end = _trim(text, start, end) if text[start:start + 2] not in _WORDS else 0
            if end and bounds:  # end on a word boundary: 客户王芳确认 is 王芳, not 王芳确
                end = next((e for e in range(end, _given_start(text, start), -1)
                            if e in bounds), end)
            if end:
                spans[(start, end)] = Span(start, end, "PERSON", self.score)
        for m in _BEFORE_TITLE.finditer(text):
            start, end = m.span("name")
            if text[start:start + 2] not in _WORDS and all(
                    c not in _NOT_GIVEN for c in text[_given_start(text, start):end]):
                spans.setdefault((start, end), Span(start, end, "PERSON", self.score))
        if seg is not None:
            taken = [(a, b) for a, b in spans]
            for start, end in _segmented_names(text, tokens, seg):
                if not any(a < end and start < b for a, b in taken):
                    spans[(start, end)] = Span(start, end, "PERSON", self.score)
        return sorted(spans.values(), key=lambda s: s.start)


def _tokens(text: str, seg: Segmenter, cue_names: list[int]) -> list[Token]:
    """The words of the CJK runs where a name may be: a cue's name inside, or a surname
    character that starts no dictionary word, or a rare listed name (segmentation is most of
    this recognizer's cost; about half of ordinary Chinese text needs none)."""
    out: list[Token] = []
    for m in _ALL_CJK.finditer(text):
        run = m.group()
        if not (any(m.start() <= p < m.end() for p in cue_names) or any(
                c in SURNAMES and (seg.freq.get(run[i:i + 2], 0) == 0
                                   or run[i:i + 2] in seg.rare_names
                                   or run[i:i + 3] in seg.rare_names)
                for i, c in enumerate(run))):
            continue
        out += [Token(t.word, t.start + m.start(), t.end + m.start(), t.known)
                for t in seg.tokens(run)]
    return out


def _surname_len(word: str) -> int:
    if word[:2] in COMPOUND_SURNAMES:
        return 2
    return 1 if word[:1] in SURNAMES else 0


def _given_ok(given: str) -> bool:
    return 1 <= len(given) <= 2 and all(c not in _NOT_GIVEN for c in given)


def _segmented_names(text: str, tokens: list[Token], seg: Segmenter) -> list[tuple[int, int]]:
    """Names the segmenter's words show, with no cue needed."""
    def firm_or_place(i: int, j: int) -> bool:
        """tokens[i:j] next to a firm's or place's word."""
        after = tokens[j].word if j < len(tokens) else ""
        before = tokens[i - 1].word if i > 0 else ""
        return (after[:1] in _PLACE_SUFFIX or after[:2] in _FIRM_WORDS
                or before[-2:] in _FIRM_WORDS)

    out = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        word = tok.word
        n = _surname_len(word)
        # the surname character ends the word before (报销单, 会来): it is no name's start
        glued = (i > 0 and tokens[i - 1].end == tok.start
                 and seg.freq.get(tokens[i - 1].word + word[:1], 0) > 0)
        if not n or glued or not _ALL_CJK.fullmatch(word) or word[:2] in _WORDS:
            i += 1
            continue
        solo = n == 1 and word[0] in _SOLO_WORDS
        if len(word) > n:  # one word: a name no dictionary holds, or a rare listed one
            given = word[n:]
            # the HMM sometimes joins a verb to the name (程浩要, 罗敏会): drop it
            while len(given) > 1 and given[-1] in _NOT_GIVEN:
                given = given[:-1]
            # a lone-word surname (来, 高) needs a two-character given name: 来取 is no name
            if ((not tok.known or (word in seg.rare_names and not solo))
                    and _given_ok(given) and len(word) - n <= 2
                    and not (solo and len(given) < 2) and not firm_or_place(i, i + 1)
                    and not (len(given) == len(word) - n and word[-1] in _PLACE_SUFFIX)):
                out.append((tok.start, tok.start + n + len(given)))
        elif n == len(word) and i + 1 < len(tokens) and not solo:
            # a lone surname, then the given name as a word of its own (孙/浩然, 陆/振华)
            nxt = tokens[i + 1]
            if (nxt.start == tok.end and _ALL_CJK.fullmatch(nxt.word) and _given_ok(nxt.word)
                    and nxt.word not in _WORDS and _surname_len(nxt.word) != len(nxt.word)
                    and not firm_or_place(i, i + 2) and nxt.word[-1] not in _PLACE_SUFFIX):
                out.append((tok.start, nxt.end))
                i += 2
                continue
        i += 1
    return out


def _given_start(text: str, start: int) -> int:
    two = text[start:start + 2]
    return start + (2 if two in COMPOUND_SURNAMES else 1)


def _trim(text: str, start: int, end: int) -> int:
    """End of the name: the given name stops before a character that ends names, or a title;
    0 when nothing of the given name is left."""
    given = _given_start(text, start)
    stop = given
    while stop < end and text[stop] not in _NOT_GIVEN and not any(
            text.startswith(t, stop) for t in TITLES):
        stop += 1
    return stop if stop > given else 0
