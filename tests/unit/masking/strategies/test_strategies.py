"""Masking strategies: FF3-1 against NIST's vectors, fpe and surrogate stand-ins (well formed,
session-bound, unique, never a real value, restored exactly, streamed or not)."""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from harness.pii_corpus import generate
from vllm_guard.masking.config import MaskingConfig
from vllm_guard.masking.detection.detector import build_detector
from vllm_guard.masking.masker import Masker
from vllm_guard.masking.pool import DetectorPool
from vllm_guard.masking.restorer import StandInMap, StreamRestorer, restore
from vllm_guard.masking.strategies import StandIns
from vllm_guard.masking.strategies.ff3_1 import FF3_1
from vllm_guard.masking.strategies.formats import well_formed
from vllm_guard.masking.strategies.fpe import FpeStrategy
from vllm_guard.masking.strategies.surrogate import person_locale
from vllm_guard.masking.vault import InMemoryVault

# NIST ACVP FF3-1 samples (56-bit tweaks), radix 10: AES-128, -192 and -256
ACVP = [
    ("2DE79D232DF5585D68CE47882AE256D6", "CBD09280979564", "3992520240", "8901801106"),
    ("01C63017111438F7FC8E24EB16C71AB5", "C4E822DCD09F27",
     "60761757463116869318437658042297305934914824457484538562",
     "35637144092473838892796702739628394376915177448290847293"),
    ("F62EDB777A671075D47563F3A1E9AC797AA706A2D8E02FC8", "493B8451BF6716", "4406616808",
     "1807744762"),
    ("1FAA03EFF55A06F8FAB3F1DC57127D493E2F8F5C365540467A3A055BDBE6481D", "4D67130C030445",
     "3679409436", "1735794859"),
    ("9CE16E125BD422A011408EB083355E7089E70A4CD2F59E141D0B94A74BCC5967", "4684635BD2C821",
     "85783290820098255530464619643265070052870796363685134012",
     "75104723514036464144839960480545848044718729603261409917"),
]
FPE = ("PHONE_NUMBER", "CREDIT_CARD", "CN_RESIDENT_ID", "US_SSN")
SURROGATE = ("PERSON", "LOCATION", "EMAIL_ADDRESS", "IP_ADDRESS", "IBAN_CODE")
STRATEGIES = {**dict.fromkeys(FPE, "fpe"), **dict.fromkeys(SURROGATE, "surrogate")}


@pytest.mark.parametrize(("key", "tweak", "plain", "cipher"), ACVP)
def test_ff3_1_matches_nist_vectors(key, tweak, plain, cipher):
    ff3 = FF3_1(bytes.fromhex(key))
    assert ff3.encrypt(plain, bytes.fromhex(tweak)) == cipher
    assert ff3.decrypt(cipher, bytes.fromhex(tweak)) == plain


def test_ff3_1_refuses_lengths_and_tweaks_outside_the_standard():
    ff3 = FF3_1(os.urandom(32))
    for digits, tweak in [("12345", bytes(7)), ("1" * 57, bytes(7)), ("123456", bytes(8))]:
        with pytest.raises(ValueError, match="FF3-1"):
            ff3.encrypt(digits, tweak)


@pytest.fixture(scope="module")
def corpus_values() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for ex in generate(600, seed=5):
        for s, e, entity in ex.spans:
            out.setdefault(entity, []).append(ex.text[s:e])
    return out


def test_fpe_is_well_formed_session_bound_and_decrypts(corpus_values):
    fpe, stand_ins = FpeStrategy(os.urandom(32)), StandIns({})
    a, b = stand_ins.session_secret("ns-a"), stand_ins.session_secret("ns-b")
    from vllm_guard.masking.strategies.base import Item

    checked = 0
    for entity in FPE:
        values = [v for v in corpus_values[entity] if well_formed(entity, v)]
        assert len(values) > 20, entity
        for value in values:
            item = Item(entity, value, 1, f"<{entity}_1>")
            out = fpe.render(item, a, 0)
            assert out is not None and out != value, (entity, value)
            assert well_formed(entity, out), (entity, value, out)
            body = slice(0, 17 if entity == "CN_RESIDENT_ID" else None)  # check may be X
            assert len(out) == len(value) and [c.isdigit() for c in out[body]] == [
                c.isdigit() for c in value[body]]  # separators where they were
            assert fpe.decrypt(entity, out, a).upper() == value.upper()
            assert fpe.render(item, a, 0) == out  # consistent in the session
            assert fpe.render(item, b, 0) != out  # another session: another value
            checked += 1
    assert checked > 200


def test_surrogates_are_well_formed_and_keep_the_names_locale(corpus_values):
    stand_ins = StandIns(dict.fromkeys(SURROGATE + FPE, "surrogate"))
    mapping, n = {}, {}
    for entity, values in corpus_values.items():
        for v in values[:60]:
            n[entity] = n.get(entity, 0) + 1
            mapping[f"<{entity}_{n[entity]}>"] = v
    table = stand_ins.table("ns", mapping)
    assert len(set(table.values())) == len(table)  # unique in the session
    assert not set(table.values()) & set(mapping.values())  # never a real value
    for ph, out in table.items():
        entity = ph[1:ph.rindex("_")]
        assert out != ph, ph  # no fallback
        if entity not in ("PERSON", "LOCATION"):
            assert well_formed(entity, out), (ph, out)
    from faker import Faker

    for locale in ("de_DE", "es_ES", "ja_JP", "zh_CN"):
        f = Faker(locale)
        f.seed_instance(1)
        names = [f.name() if locale != "ja_JP" else
                 f"{f.first_romanized_name()} {f.last_romanized_name()}" for _ in range(40)]
        names = [x for x in names if person_locale(x) == locale]
        assert len(names) >= 20, locale  # the lists know the locale's names
        table = stand_ins.table("ns", {f"<PERSON_{i}>": x for i, x in enumerate(names, 1)})
        same = sum(person_locale(s) == locale for s in table.values())
        assert same >= 0.9 * len(names), (locale, same, len(names))


def test_a_later_value_equal_to_a_stand_in_wins_and_the_stand_in_is_redrawn():
    stand_ins = StandIns({"PERSON": "surrogate"})
    first = stand_ins.table("ns", {"<PERSON_1>": "Jane Roe"})["<PERSON_1>"]
    again = stand_ins.table("ns", {"<PERSON_1>": "Jane Roe", "<PERSON_2>": "Ann Lee"})
    assert again["<PERSON_1>"] == first  # consistent in the session
    clash = stand_ins.table("ns", {"<PERSON_1>": "Jane Roe", "<PERSON_2>": first})
    assert clash["<PERSON_1>"] != first and first not in clash.values()
    assert len(set(clash.values())) == 2
    assert stand_ins.table("other", {"<PERSON_1>": "Jane Roe"})["<PERSON_1>"] != first


def test_literal_stand_ins_restore_as_whole_words_and_longest_first():
    m = StandInMap({"Anna Berg": "Jane Roe", "Anna": "Bob", "4698 1881 5641 8172": "4111",
                    "<PERSON_3>": "Zed"})
    assert restore("Anna Berg met Anna; Anna Bergmann and <PERSON_3>.", m) == (
        "Jane Roe met Bob; Bob Bergmann and Zed.")  # "Anna" is a word there
    assert restore("card 4698 1881 5641 81725", m) == "card 4698 1881 5641 81725"


def test_streamed_restore_equals_whole_restore_at_every_split():
    rng = random.Random(3)
    m = StandInMap({"Anna Berg": "Jane Roe", "Anna": "Bob", "熊慧": "张三",
                    "(176) 030-2107": "(555) 123-4567", "<EMAIL_ADDRESS_1>": "a@b.c"})
    texts = ["Anna Berg called (176) 030-2107; Anna Bergmann did not. 熊慧先生 <EMAIL_ADDRESS_1>",
             "Anna", "Anna Ber", "x Anna Berg", "(176) 030-21075 Anna Berg", "熊慧"]
    for text in texts:
        want = restore(text, m)
        for _ in range(200):
            cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1,
                                                              rng.randint(1, 6))))
            parts = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
            sr = StreamRestorer(m)
            got = "".join(sr.feed("k", p) for p in parts) + sr.flush("k")
            assert got == want, (text, parts)


def test_stream_holds_only_what_can_still_become_a_stand_in():
    sr = StreamRestorer(StandInMap({"Anna Berg": "Jane Roe"}))
    assert sr.feed("k", "Hello An") == "Hello "  # "An" may become "Anna Berg"
    assert sr.feed("k", "dre") == "Andre"  # it did not: out at once
    assert sr.feed("k", " Anna Berg") == " "  # complete, but "Anna Bergmann" is not it
    assert sr.feed("k", ".") == "Jane Roe."


def test_masker_with_strategies_hides_and_restores_the_corpus():
    """In process, 300 prompts: no detected value left in the masked text, exact restore."""
    key = os.urandom(32)
    config = MaskingConfig(detector_workers=0, strategies=STRATEGIES)
    detector = build_detector(config)
    masker = Masker(DetectorPool(lambda: detector, None, 0, 60), InMemoryVault(),
                    stand_ins=StandIns(STRATEGIES, key))

    async def go() -> None:
        for i, ex in enumerate(generate(300, seed=17)):
            body = {"model": "m", "prompt": ex.text}
            mapping = await masker.mask_request(f"ns{i % 7}", "/v1/completions", body)
            masked = body["prompt"]
            found = {ex.text[sp.start:sp.end] for sp in detector.detect(ex.text)}
            assert not [v for v in found if v in masked], ex.text
            assert "<" not in masked or "<" in ex.text  # every entity rendered, no placeholder
            assert restore(masked, mapping) == ex.text

    asyncio.run(go())


# --- glued stand-ins and typed look-alikes (issue #32 item 4) --------------------------------


@pytest.fixture(scope="module")
def fast_masker() -> Masker:
    config = MaskingConfig(ner="off", detector_workers=0, strategies=STRATEGIES)
    detector = build_detector(config)
    return Masker(DetectorPool(lambda: detector, None, 0, 60), InMemoryVault(),
                  stand_ins=StandIns(STRATEGIES, os.urandom(32)))


def _mask(masker: Masker, prompt: str, ns: str) -> tuple[str, StandInMap]:
    body = {"model": "m", "prompt": prompt}
    mapping = asyncio.run(masker.mask_request(ns, "/v1/completions", body))
    return body["prompt"], mapping


def test_a_value_glued_to_a_word_comes_back_exactly(fast_masker):
    """A value that touches a letter or digit ("...1111ri"; a known name inside a longer word)
    must come back as it was sent, never as its stand-in, whole or streamed."""
    card, name = "4111 1111 1111 1111", "Jon Cole"
    first = f"card {card}ri from {name}."
    masked, mapping = _mask(fast_masker, first, "glue")
    assert card not in masked and name not in masked
    assert restore(masked, mapping) == first
    again = f"{name}ri, x{name}, {card}7 and {name}"  # known values, glued where they occur
    masked, mapping = _mask(fast_masker, again, "glue")
    assert card not in masked and name not in masked
    assert restore(masked, mapping) == again
    for cut in range(1, len(masked)):
        sr = StreamRestorer(mapping)
        assert sr.feed("k", masked[:cut]) + sr.feed("k", masked[cut:]) + sr.flush("k") == again


def test_typed_look_alikes_come_back_exactly_as_typed(fast_masker):
    prompt = "Template: Dear <PERSON_1>, card <CARD_4111111111111111>, ref <X_2>."
    masked, mapping = _mask(fast_masker, prompt, "look")
    assert "<PERSON_1>" not in masked and "4111111111111111" not in masked
    assert restore(masked, mapping) == prompt
    for cut in range(1, len(masked)):
        sr = StreamRestorer(mapping)
        assert sr.feed("k", masked[:cut]) + sr.feed("k", masked[cut:]) + sr.flush("k") == prompt
    # the owner's own placeholder typed: restored as typed, never to the session's value
    _mask(fast_masker, "mail jane.roe@example.com", "look2")
    masked, mapping = _mask(fast_masker, "echo <EMAIL_ADDRESS_1>", "look2")
    assert restore(masked, mapping) == "echo <EMAIL_ADDRESS_1>"
    # a neutral form the client typed itself is never turned into a placeholder
    both = "\u2039PERSON 1\u203a and <PERSON_1>"
    masked, mapping = _mask(fast_masker, both, "look3")
    assert restore(masked, mapping).startswith("\u2039PERSON 1\u203a and ")
