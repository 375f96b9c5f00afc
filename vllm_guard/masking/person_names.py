"""PERSON from the name gazetteer (:mod:`vllm_guard.masking.name_gazetteer`), in any Latin,
Cyrillic or Greek script: a run of capitalised words that are all known names, starting
with a first name and ending with a last name ("José Mari Carranza", "Davi Lucas da Cunha"),
or family name first for East Asian names ("Nguyễn Văn An", "Tanaka Hiroshi").

spaCy's small English model misses names in list-like text ("Contact: Jon Cole - 555-...")
and most non-English names; requiring known names at both ends, capitalised, keeps
sentence-initial words ("May", "Will") and lone surnames out.
"""

from __future__ import annotations

import re

from presidio_analyzer import EntityRecognizer, RecognizerResult

from vllm_guard.masking.name_gazetteer import Gazetteer, fold

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
                       "easter"})


def _capitalised(word: str) -> bool:
    return word[0].isupper() and any(c.islower() for c in word[1:])


class GuardPersonNameRecognizer(EntityRecognizer):
    SCORE = 0.7

    def __init__(self, names: Gazetteer) -> None:
        self.names = names
        self._known = names.first | names.last
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

    def _is_family_first(self, words: list[str]) -> bool:
        """An East Asian family name and one or two short given-name syllables ("Trần Thị
        Hoa", "Wang Fang"): given names there are too many to list, their shape is not."""
        keys = [fold(w) for w in words]
        return (keys[0] in self.names.family_first and keys[0] not in NOT_FIRST
                and 2 <= len(keys) <= 4 and all(len(k) <= MAX_SYLLABLE for k in keys[1:]))

    def analyze(self, text: str, entities: list[str], nlp_artifacts=None) -> list:
        out = []
        run: list[re.Match[str]] = []  # capitalised words (and particles) joined by gaps
        # initials ("J.") are part of the gap between two words of a name, not words
        words = [m for m in _WORD.finditer(text)
                 if len(m.group()) > 1 or text[m.end():m.end() + 1] != "."]
        for m in [*words, None]:
            word = m.group() if m else ""
            joined = bool(run) and m is not None and _GAP.fullmatch(text, run[-1].end(),
                                                                     m.start())
            if m is not None and (_capitalised(word) or (word in PARTICLES and run)) and (
                    joined or not run):
                run.append(m)
                continue
            out.extend(self._names_in(run))
            run = [m] if m is not None and _capitalised(word) else []
        return out

    def _names_in(self, run: list[re.Match[str]]) -> list[RecognizerResult]:
        """The longest known-name stretches of one run (particles never at either end)."""
        words = [m.group() for m in run]
        found, i = [], 0
        while i < len(run):
            for j in range(min(len(run), i + MAX_WORDS), i + 1, -1):
                if (words[i] not in PARTICLES and words[j - 1] not in PARTICLES
                        and (self._is_name(words[i:j]) or self._is_family_first(words[i:j]))):
                    found.append(RecognizerResult("PERSON", run[i].start(), run[j - 1].end(),
                                                  self.SCORE))
                    i = j
                    break
            else:
                i += 1
        return found
