"""PERSON from the sentence's evidence, for names no list holds ("Meet Thirunavukkarasu
Ilangovan", "Senthilnathan Muthuvel called"): two or three capitalised words, none a listed
name nor a common English word nor a word that starts places (the guards of
:func:`vllm_guard.masking.detection.person_names.unlisted_first_name`), with

- a word that introduces a person right before them: "Meet", "with", "and", "ask", "Dear",
  "Hi", "by", "cc" (see :data:`INTRODUCERS`), or
- a verb of what people do right after them: "called", "said", "will", "approved" (see
  :data:`PERSON_VERBS`).

spaCy's small model misses many such names; longer lists would not hold them all. The
composite's context rules (firm nouns, place and organisation words) still apply.
"""

from __future__ import annotations

import re

from vllm_guard.masking.detection.name_gazetteer import Gazetteer, fold
from vllm_guard.masking.detection.person_names import unlisted_first_name
from vllm_guard.masking.types import Detector, Span

INTRODUCERS = frozenset({"meet", "met", "with", "and", "ask", "asked", "dear", "hi", "hello",
                         "thanks", "thank", "by", "cc", "contact", "call", "tell", "told",
                         "email", "invite", "invited", "ping", "introducing", "welcome"})
PERSON_VERBS = frozenset({"called", "said", "says", "asked", "wrote", "writes", "sent",
                          "signed", "agreed", "approved", "joined", "will", "would", "can",
                          "could", "should", "has", "had", "is", "was", "told", "replied",
                          "emailed", "phoned", "met", "owes", "left", "thinks", "thought",
                          "wants", "wanted", "confirmed", "promised", "starts", "started",
                          "works", "worked", "lives", "visited", "reported", "complained"})
# a run of capitalised words, a space between each
_WORD = r"[^\W\d_][^\W\d_'’-]+"
_RUN = re.compile(rf"(?<![\w'’-]){_WORD}(?:[ ]{_WORD})*(?![\w'’-])")
_BEFORE = re.compile(r"([^\W\d_]+)[ \t]+$")
_AFTER = re.compile(r"[ \t]+([a-z]+)\b")
SCORE = 0.7  # the gazetteer's


class SentenceNameDetector(Detector):
    def __init__(self, names: Gazetteer):
        self.names = names

    def detect(self, text: str) -> list[Span]:
        out = []
        for m in _RUN.finditer(text):
            # the capitalised words that qualify, in stretches ("Meet" stays out of one)
            pos, stretch = m.start(), []
            for word in [*m.group().split(" "), ""]:
                if word and word[0].isupper() and self._unlisted(word):
                    stretch.append((pos, word))
                else:
                    self._judge(text, stretch, out)
                    stretch = []
                pos += len(word) + 1
        return out

    def _unlisted(self, word: str) -> bool:
        return unlisted_first_name(word, self.names) and fold(word) not in self.names.last

    def _judge(self, text: str, stretch: list[tuple[int, str]], out: list[Span]) -> None:
        if not 2 <= len(stretch) <= 3:
            return
        start, end = stretch[0][0], stretch[-1][0] + len(stretch[-1][1])
        before = _BEFORE.search(text, max(0, start - 20), start)
        after = _AFTER.match(text, end)
        if ((before is not None and before.group(1).lower() in INTRODUCERS)
                or (after is not None and after.group(1) in PERSON_VERBS)):
            out.append(Span(start, end, "PERSON", SCORE))
