"""Chinese personal names in CJK text: a common surname, a one- or two-character given name,
and a cue next to it (用户张三, 张三先生, 姓名：张三). spaCy's English model cannot read CJK
and the US name lists do not hold these names.

Without a cue a surname character is too often an ordinary word (高兴, 王国, 明天), so
names with no cue on either side are not claimed: precision over recall, measured in
``tests/unit/masking/detection/test_chinese_names.py``.
"""

from __future__ import annotations

import re

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
                 "这那有没不很才再先女士生老师经理同学今昨反刚正买打问")
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


class ChineseNameDetector(Detector):
    """PERSON spans for Chinese names beside a cue."""

    def __init__(self, score: float = 0.85):
        self.score = score

    def detect(self, text: str) -> list[Span]:
        if not re.search(f"[{_CJK}]", text):
            return []
        spans: dict[tuple[int, int], Span] = {}
        for m in _AFTER_CUE.finditer(text):
            start, end = m.span("name")
            end = _trim(text, start, end) if text[start:start + 2] not in _WORDS else 0
            if end:
                spans[(start, end)] = Span(start, end, "PERSON", self.score)
        for m in _BEFORE_TITLE.finditer(text):
            start, end = m.span("name")
            if text[start:start + 2] not in _WORDS and all(
                    c not in _NOT_GIVEN for c in text[_given_start(text, start):end]):
                spans.setdefault((start, end), Span(start, end, "PERSON", self.score))
        return sorted(spans.values(), key=lambda s: s.start)


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
