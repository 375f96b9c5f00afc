"""Names no list holds, found by the sentence's evidence: a word that introduces a person
before them ("Meet", "with", "and") or a verb of what people do after them ("called")."""

from __future__ import annotations

import pytest

from vllm_guard.masking.detection.name_gazetteer import gazetteer
from vllm_guard.masking.detection.sentence_names import SentenceNameDetector


def persons(det, text: str) -> list[str]:
    return [text[s.start:s.end] for s in det.detect(text) if s.entity == "PERSON"]


# Tamil, Telugu, Yoruba, Igbo names: no word of them is in a shipped list
@pytest.mark.parametrize(("text", "want"), [
    ("Meet Thirunavukkarasu Ilangovan tomorrow.", ["Thirunavukkarasu Ilangovan"]),
    ("I met with Kaveri Palanisamy yesterday.", ["Kaveri Palanisamy"]),
    ("Senthilnathan Muthuvel called twice about the invoice.", ["Senthilnathan Muthuvel"]),
    ("Dhanushkodi Velmurugan will join us.", ["Dhanushkodi Velmurugan"]),
    ("Thanks Venkataramana Bhogadi, see you.", ["Venkataramana Bhogadi"]),
    ("The form was signed by Oluwatobiloba Adewumi yesterday.", ["Oluwatobiloba Adewumi"]),
    ("Chukwunonso Obiageli approved the budget.", ["Chukwunonso Obiageli"]),
])
def test_unlisted_names_with_evidence(default_detector, fast_detector, text, want):
    assert persons(default_detector, text) == want
    assert persons(fast_detector, text) == want


@pytest.mark.parametrize("text", [
    "Meet Microsoft Teams users.",  # common words
    "Lunch with Burger King staff.",
    "The Harbourview Terrace opened.",  # no evidence either side
    "Thirunavukkarasu Ilangovan Street is closed.",  # no verb after, no word before
])
def test_no_evidence_no_claim(text):
    assert persons(SentenceNameDetector(gazetteer()), text) == []
