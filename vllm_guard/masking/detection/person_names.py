"""PERSON from the name gazetteer (:mod:`vllm_guard.masking.detection.name_gazetteer`), in
any Latin, Cyrillic or Greek script: a run of capitalised words that are all known names,
starting with a first name and ending with a last name ("José Mari Carranza", "Davi Lucas da
Cunha"), or family name first for East Asian names ("Nguyễn Văn An", "Tanaka Hiroshi").

A first name no list holds ("Kuldeep Salvi", "Bülent Ergül") counts before a known surname
when it is not a common English word (:mod:`vllm_guard.masking.detection.common_words`):
"Burger King" and "Black Friday" are not people. Japanese given names are too many to list, but
their romanisation has a shape (":data:`HEPBURN`": "Yamaguchi Mitsuru").

spaCy's small English model misses names in list-like text ("Contact: Jon Cole - 555-...")
and most non-English names; requiring known names at both ends, capitalised, keeps
sentence-initial words ("May", "Will") and lone surnames out.
"""

from __future__ import annotations

import re

from presidio_analyzer import EntityRecognizer, RecognizerResult

from vllm_guard.masking.detection.common_words import VERY_COMMON, is_common
from vllm_guard.masking.detection.name_gazetteer import Gazetteer, fold

# letters only (no digits or "_"), with inner apostrophes and hyphens: O'Neil, Jean-Luc
_WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")
# what may stand between two words of one name: spaces, or a middle initial
_GAP = re.compile(r"[ \t]+(?:[^\W\d_]\.[ \t]+)?")
PARTICLES = frozenset({"da", "das", "de", "del", "della", "der", "den", "di", "do", "dos",
                       "du", "la", "le", "van", "von", "y", "bin", "binti", "al", "ten", "ter",
                       "zu"})
MAX_WORDS = 5
MAX_SYLLABLE = 6  # letters in one romanised East Asian given-name syllable ("Hoa", "Zhang")
# never a name's first word, though some locale's list has it: function words ("The New"),
# and the first words of place names ("North Tony", "Rio Grande", "Saint Alfred")
NOT_FIRST = frozenset({"the", "a", "an", "and", "or", "of", "in", "on", "at", "to", "for",
                       "from", "with", "by", "our", "your", "my", "his", "her", "its", "their",
                       "this", "that", "these", "those", "dear", "hi", "hello", "mr", "mrs",
                       "ms", "dr", "north", "south", "east", "west", "new", "saint", "san",
                       "santa", "st", "rio", "monte", "mont", "port", "lake", "mount", "fort",
                       "easter", "sainte", "porto", "los", "las", "el", "il", "le", "la",
                       "les", "der", "die", "das", "bad", "villa", "isla", "cabo", "sant",
                       "são", "santo", "governador", "presidente", "marechal", "princesa",
                       "coronel", "sankt", "ciudad", "cidade", "ciutat", "barri", "bairro",
                       "vila", "nueva", "nuevo", "nova", "novo", "nowy", "nowa", "nowe",
                       "stary", "stara", "stare", "cerro", "ouro", "balneário", "estância",
                       "ribeirão", "três", "cuatro", "quatro", "puerto", "puente", "ponte",
                       "castel", "hohen", "ober", "unter", "nieder"})
# a romanised Japanese given name: Hepburn syllables, a doubled consonant or a final "n"
# allowed ("Mitsuru", "Yoshinori", "Ippei", "Kenichi", "Jun")
HEPBURN = re.compile(r"(?:(?:([kgsztdbpmr])(?=\1))?(?:(?:[kgsztdnhbpmr]y?|sh|ch|ts|j|f|w|y)?"
                     r"[aiueo]|n))+")
MAX_GIVEN = 10  # letters in a romanised Japanese given name ("Kazuyoshi")
_NO_MACRONS = str.maketrans("āēīōū", "aeiou")
# the commonest Vietnamese family names (with Faker's vi_VN list, ~90% of people)
VIETNAMESE_FAMILY = frozenset(fold(w) for w in (
    "Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Huỳnh", "Phan", "Vũ", "Võ", "Đặng", "Bùi", "Đỗ",
    "Hồ", "Ngô", "Dương", "Lý", "Mai", "Đinh", "Trương", "Lâm", "Đoàn", "Tạ", "Lưu", "Cao"))
# letters only Vietnamese uses among Latin scripts (ơ, ư, đ, ă and the stacked tones)
VIETNAMESE = re.compile("[\u0102\u0103\u0110\u0111\u01a0\u01a1\u01af\u01b0\u1ea0-\u1ef9]")


def unlisted_first_name(word: str, names: Gazetteer) -> bool:
    """A capitalised word that may be a first name no list holds: not a listed name, not a
    word that starts places or sentences, not a common English word."""
    key = fold(word)  # a surname may be one too ("Suman", "Lech", "Mohan" are listed as such)
    # Vietnamese syllables are not first names of this shape ("Giá Rai", "Thới Lai" are
    # towns): Vietnamese names are the family-first rule's
    return (len(key) > 2 and capitalised(word) and key not in names.first
            and key not in NOT_FIRST and not is_common(word) and not VIETNAMESE.search(word))


def plausible_person(words: list[str], names: Gazetteer) -> bool:
    """Two or more words that could be one person's name: the first does not start places
    or sentences, and each is a listed name or not a common English word ("Best Buy" is
    not); or a listed first name leads and the last word is no everyday word ("Mark Twain",
    not "Ford Focus"). Upper case counts as capitalised ("JOHN SMITH")."""
    if not words or fold(words[0]) in PARTICLES:
        return False
    words = [w for w in words if w.lower() not in PARTICLES]
    if (len(words) < 2 or fold(words[0]) in NOT_FIRST
            or not (capitalised(words[0]) or words[0].isupper())):
        return False
    if fold(words[0]) in names.first and not is_common(words[-1], VERY_COMMON):
        return True
    return all(fold(w) in names.known or not is_common(w) for w in words)


def capitalised(word: str) -> bool:
    return word[0].isupper() and any(c.islower() for c in word[1:])


class GuardPersonNameRecognizer(EntityRecognizer):
    SCORE = 0.7

    def __init__(self, names: Gazetteer) -> None:
        self.names = names
        self._known = names.known
        # the last text and its name spans: the Presidio pass and the NER's sentence filter
        # ask about the same text one after the other (build_detector shares one instance)
        self._memo: tuple[str, list[tuple[int, int]]] | None = None
        super().__init__(supported_entities=["PERSON"], name=type(self).__name__,
                         supported_language="en")

    def load(self) -> None:
        pass

    def _is_name(self, words: list[str]) -> bool:
        # O'Neil folds to "oneil"; a hyphenated word counts as known when a part is
        # ("Karl-Heinz", "Müller-Lüdenscheidt")
        parts = [[fold(w), *(fold(p) for p in w.split("-") if "-" in w)] for w in words
                 if w.lower() not in PARTICLES]
        if (len(parts) < 2 or parts[0][0] in NOT_FIRST
                or any(not any(p in self._known for p in word) for word in parts)):
            return False
        n = self.names
        return ((any(p in n.first for p in parts[0]) and any(p in n.last for p in parts[-1]))
                or (parts[0][0] in n.family_first and parts[-1][0] in n.given_after))

    def _is_unlisted_first(self, words: list[str]) -> bool:
        """An unlisted first name, then known names ending with a surname ("Kuldeep Salvi",
        "Wiesław Ziętal", "Rogério da Rosa"). A listed surname first takes no particle:
        "Barbosa de Minas", "Azevedo da Serra" are towns."""
        names = [w for w in words if w.lower() not in PARTICLES]
        if not 2 <= len(names) <= 3 or not unlisted_first_name(names[0], self.names):
            return False
        if len(names) < len(words) and fold(names[0]) in self.names.last:
            return False
        words = names
        return (all(fold(w) in self._known for w in words[1:])
                and fold(words[-1]) in self.names.last)

    def _is_family_first(self, words: list[str]) -> bool:
        """An East Asian family name and one or two short given-name syllables ("Trần Thị
        Hoa", "Wang Fang"): given names there are too many to list, their shape is not."""
        keys = [fold(w) for w in words]
        if keys[0] not in self.names.family_first or keys[0] in NOT_FIRST:
            return False
        if (any(not k.translate(_NO_MACRONS).isascii() for k in keys[1:])
                and keys[0] not in VIETNAMESE_FAMILY):
            # accented syllables after a pinyin name: a place ("Long Xuyên"); Japanese
            # macrons are a name's ("Sato Yūko")
            return False
        given = keys[-1].translate(_NO_MACRONS)
        if len(keys) == 2 and len(given) <= MAX_GIVEN and HEPBURN.fullmatch(given):
            # "Yamaguchi Mitsuru", "Sato Ai"; after a family name that is also an everyday
            # word, not an everyday word ("Abe Kobe", not "Abe Home")
            return not (is_common(words[0], VERY_COMMON) and is_common(words[1]))
        return 2 <= len(keys) <= 4 and all(len(k) <= MAX_SYLLABLE for k in keys[1:])

    def analyze(self, text: str, entities: list[str], nlp_artifacts=None) -> list:
        memo = self._memo
        if memo is None or memo[0] != text:
            memo = self._memo = (text, self._name_spans(text))
        return [RecognizerResult("PERSON", start, end, self.SCORE) for start, end in memo[1]]

    def _name_spans(self, text: str) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        run: list[re.Match[str]] = []  # capitalised words (and particles) joined by gaps
        # initials ("J.") are part of the gap between two words of a name, not words
        words = [m for m in _WORD.finditer(text)
                 if len(m.group()) > 1 or text[m.end():m.end() + 1] != "."]
        for m in [*words, None]:
            word = m.group() if m else ""
            joined = bool(run) and m is not None and _GAP.fullmatch(text, run[-1].end(),
                                                                     m.start())
            if m is not None and (capitalised(word) or (word in PARTICLES and run)) and (
                    joined or not run):
                run.append(m)
                continue
            out.extend(self._names_in(run))
            run = [m] if m is not None and capitalised(word) else []
        return out

    def _names_in(self, run: list[re.Match[str]]) -> list[tuple[int, int]]:
        """The longest known-name stretches of one run (particles never at either end)."""
        words = [m.group() for m in run]
        found, i = [], 0
        while i < len(run):
            for j in range(min(len(run), i + MAX_WORDS), i + 1, -1):
                if (words[i] not in PARTICLES and words[j - 1] not in PARTICLES
                        and (self._is_name(words[i:j]) or self._is_family_first(words[i:j])
                             or self._is_unlisted_first(words[i:j]))):
                    found.append((run[i].start(), run[j - 1].end()))
                    i = j
                    break
            else:
                i += 1
        return found
