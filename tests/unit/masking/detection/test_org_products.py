"""Companies, brands and products are not people (issue #34): the NER model's ORG/PRODUCT
labels veto a name-list PERSON on the same words, and a lowercase noun right after a name
("Morgan Stanley report", "Ford Mustang sales") makes it a modifier, a firm's or a product's.
Real names keep their recall (the held-out names: test_person_locales)."""

from __future__ import annotations

import pytest

from harness.org_sentences import ORG_SENTENCES, masked_as_person
from vllm_guard.masking.detection.context import ContextFilter, ContextRule
from vllm_guard.masking.detection.detector import CompositeDetector
from vllm_guard.masking.detection.ner import NOT_PERSON
from vllm_guard.masking.types import Detector, Span


def persons(det, text: str) -> list[str]:
    return [text[s.start:s.end] for s in det.detect(text) if s.entity == "PERSON"]


@pytest.mark.parametrize("profile", ["default", "fast"])
def test_at_most_one_in_twenty_companies_masked_as_a_person(request, profile):
    det = request.getfixturevalue(f"{profile}_detector")
    assert len(ORG_SENTENCES) >= 60
    masked = masked_as_person(det.detect)
    assert len(masked) * 20 <= len(ORG_SENTENCES), masked


@pytest.mark.parametrize("text", ["The Morgan Stanley report mentions Goldman Sachs.",
                                  "Ford Mustang sales rose in March.",
                                  "Alfa Romeo Giulia reviews are positive.",
                                  "Warner Bros announced a new film."])
def test_issue_examples(default_detector, text):
    assert persons(default_detector, text) == []


@pytest.mark.parametrize(("text", "name"), [
    ("Mary Smith reported higher sales.", "Mary Smith"),  # a verb, not one of the nouns
    ("John Smith called about the report.", "John Smith"),
    ("Please ask Oluwaseun Adebayo to sign it.", "Oluwaseun Adebayo"),
    ("Send the sales figures to Emma Wilson today.", "Emma Wilson"),
])
def test_people_beside_business_words_stay_people(default_detector, text, name):
    assert persons(default_detector, text) == [name]


class _Fixed(Detector):
    def __init__(self, spans: list[Span]):
        self.spans = spans

    def detect(self, text: str) -> list[Span]:
        return list(self.spans)


def test_model_org_label_vetoes_a_listed_person_inside_a_longer_name():
    """The model's ORG/PRODUCT span vetoes a listed PERSON strictly inside it ("Martha
    Stewart Living"), not one on the same words (it calls many real names ORG), and never
    leaves the composite."""
    text = "Martha Stewart Living changed."
    listed = Span(0, 14, "PERSON", 0.7)
    vetoed = CompositeDetector([_Fixed([listed]), _Fixed([Span(0, 21, NOT_PERSON, 0.85)])])
    assert vetoed.detect(text) == []
    same = CompositeDetector([_Fixed([listed]), _Fixed([Span(0, 14, NOT_PERSON, 0.85)])])
    assert [s.entity for s in same.detect(text)] == ["PERSON"]


def test_nouns_after_rule():
    ctx = ContextFilter({"PERSON": ContextRule(nouns_after=("report", "sale"))}, {})
    for text, exempt in (("Morgan Stanley report", True), ("Morgan Stanley sales rose", True),
                         ("Morgan Stanley Bank sales", True),  # past capitalised words
                         ("Morgan Stanley's report", False), ("Morgan Stanley called", False),
                         ("the Morgan Stanley campaign", True)):
        start = text.index("Morgan")
        assert ctx.exempt(text, start, start + len("Morgan Stanley"), "PERSON") is exempt, text
    with pytest.raises(ValueError):
        ContextRule(nouns_after=("",))
