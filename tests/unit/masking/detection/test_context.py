"""IPv6 in every textual form, context rules ("Ronald Reagan Airport" is a place) and the
operator's always-sensitive values, which win over the rules and the allow list."""

from __future__ import annotations

import json

import pytest

from vllm_guard.errors import GuardError
from vllm_guard.masking.config import MaskingConfig
from vllm_guard.masking.detection.context import ContextFilter, ContextRule, default_context
from vllm_guard.masking.detection.detector import build_detector

FAST = MaskingConfig(ner="off")  # census name lists: no spaCy needed for these tests


def found(cfg: MaskingConfig, text: str) -> list[tuple[str, str]]:
    return [(text[s.start:s.end], s.entity) for s in build_detector(cfg).detect(text)]


@pytest.mark.parametrize("addr", [
    "2001:db8::1", "::1", "fe80::1%eth0", "::ffff:192.0.2.128", "2001:db8::/32",
    "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "2001:db8::ff00:42:8329", "FE80::A:B",
])
def test_ipv6_in_every_form_is_masked(addr):
    for text in (f"server {addr} is down", f"addr: {addr}.", f"[{addr}]:443", f"（{addr}）"):
        assert (addr, "IP_ADDRESS") in found(FAST, text), text


@pytest.mark.parametrize("text", [
    "meeting at 12:30:45 today", "mac 00:1A:2B:3C:4D:5E here", "use std::vector<int>",
    "ratio 3:2:1", "bad 2001:db8:::1 addr", "x 1::2::3 y", "too many 1:2:3:4:5:6:7:8:9 groups",
])
def test_things_shaped_like_ipv6_are_not_addresses(text):
    assert not [f for f in found(FAST, text) if f[1] == "IP_ADDRESS"], text


@pytest.mark.parametrize("cfg", [FAST, MaskingConfig()], ids=["fast", "default"])
def test_context_words_make_a_name_a_place_but_not_a_user(cfg):
    assert ("Ronald Regan", "PERSON") in found(cfg, "My user Ronald Regan wants a refund.")
    assert ("Ronald Reagan", "PERSON") in found(cfg, "Contact Ronald Reagan about it.")
    for place in ("I landed at Ronald Reagan Washington National Airport yesterday.",
                  "Ronald Reagan St. is closed today.", "We hiked Mount Elizabeth Taylor."):
        assert not [f for f in found(cfg, place) if f[1] == "PERSON"], place
    mixed = found(cfg, "She studied at John Hopkins University and met Mary Smith.")
    assert ("Mary Smith", "PERSON") in mixed
    assert not any("John" in v for v, _ in mixed)


def test_always_sensitive_wins_over_context_and_allow_list():
    cfg = MaskingConfig(ner="off", allow_list=("Ronald Reagan",),
                        always_sensitive={"PERSON": ("Ronald Reagan",)})
    assert found(cfg, "I landed at Ronald Reagan Airport.") == [("Ronald Reagan", "PERSON")]
    # found even where no recognizer would: the operator's list is a detector too
    odd = MaskingConfig(ner="off", always_sensitive={"SENSITIVE_TERM": ("Project Bluebird",)})
    assert found(odd, "status of project bluebird?") == [("project bluebird",
                                                          "SENSITIVE_TERM")]


def test_operator_context_rules_replace_the_default_per_entity(tmp_path):
    path = tmp_path / "masking.json"
    path.write_text(json.dumps({"ner": "off", "context": {"PERSON": {"after": ["Hall"]}}}))
    cfg = MaskingConfig.load(path)
    assert cfg.context["PERSON"] == ContextRule(after=("Hall",))
    assert found(cfg, "Dinner at Mary Smith Hall.") == []
    assert found(cfg, "Fly via Ronald Reagan Airport.") == [("Ronald Reagan", "PERSON")]
    none = MaskingConfig(ner="off", context={})
    assert found(none, "Fly via Ronald Reagan Airport.") == [("Ronald Reagan", "PERSON")]
    firms = "Paid Ana Silva e Filhos and Baria Nagar."
    assert found(MaskingConfig(ner="off"), firms) == []
    path.write_text(json.dumps({"ner": "off", "context": {"PERSON": {
        "phrases": ["e Filhos"], "unnamed_ends": ["Nagar"]}}}))
    assert MaskingConfig.load(path).context["PERSON"] == ContextRule(
        phrases=("e Filhos",), unnamed_ends=("Nagar",))
    path.write_text(json.dumps({"ner": "off", "context": {"PERSON": {}}}))
    assert {v for v, _ in found(MaskingConfig.load(path), firms)} == {"Ana Silva",
                                                                       "Baria Nagar"}


@pytest.mark.parametrize("text, name", [
    # lowercase street types that are English words ("put", "rang", "route") hide nothing
    ("Please put Ana Smith on the list.", "Ana Smith"),
    ("I rang Maria Ana Smith yesterday.", "Maria Ana Smith"),
    ("The route John Smith took was long.", "John Smith"),
])
def test_context_words_never_hide_a_person_in_ordinary_text(text, name):
    assert (name, "PERSON") in found(FAST, text)


@pytest.mark.parametrize("text, name", [
    ("Ask J. Grande or A. Nagar.", "J. Grande"), ("Ask J. Grande or A. Nagar.", "A. Nagar"),
    ("Films by W.C. Fields.", "W.C. Fields")])
def test_an_initial_is_no_evidence_of_a_place(text, name):
    """NER finds such names; the place-word rule for matches without a listed first name
    must not read an initial as that evidence."""
    start = text.index(name)
    rules = ContextFilter(default_context(), {})
    assert not rules.exempt(text, start, start + len(name), "PERSON")


@pytest.mark.parametrize("doc, key", [
    ({"context": {"PERSN": {"after": ["Airport"]}}}, "PERSN"),
    ({"context": {"PERSON": {"afterr": ["Airport"]}}}, "afterr"),
    ({"always_sensitive": {"NAME": ["x"]}}, "NAME"),
    ({"always_sensitive": {"PERSON": [" "]}}, "empty"),
    ({"context": {"PERSON": {"phrases": [""]}}}, "phrases"),  # would exempt every name
    ({"context": {"PERSON": {"unnamed_ends": [","]}}}, "unnamed_ends"),
])
def test_bad_context_config_is_one_clear_error(tmp_path, doc, key):
    path = tmp_path / "masking.json"
    path.write_text(json.dumps(doc))
    with pytest.raises((GuardError, ValueError), match=key) as e:
        MaskingConfig.load(path)
    assert "\n" not in str(e.value)
