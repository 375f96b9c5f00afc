"""Synthetic PII corpus with known entity spans (Faker en_US + zh_CN), and its scoring.

``python -m harness.pii_corpus --n 1200 --out corpus.jsonl``
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from vllm_guard.masking.detection.recognizers import cn_resident_id_valid

CARD_TYPES = ["visa16", "visa19", "mastercard", "amex", "discover", "jcb16", "diners",
              "maestro"]


@dataclass
class LabelledText:
    text: str
    spans: list[tuple[int, int, str]]  # start, end, entity
    lang: str

    def to_json(self) -> str:
        return json.dumps({"text": self.text, "spans": self.spans, "lang": self.lang},
                          ensure_ascii=False)


def _build(parts: list[str | tuple[str, str]], lang: str) -> LabelledText:
    text, spans = "", []
    for p in parts:
        if isinstance(p, tuple):
            entity, value = p
            spans.append((len(text), len(text) + len(value), entity))
            text += value
        else:
            text += p
    return LabelledText(text, spans, lang)


def _en(f, rng: random.Random, people=None) -> LabelledText:
    values: list[Callable[[], tuple[str, str]]] = [
        lambda: ("PERSON", (people or f).name()),
        lambda: ("EMAIL_ADDRESS", f.email()),
        lambda: ("PHONE_NUMBER", f.phone_number()),
        lambda: ("CREDIT_CARD", f.credit_card_number(card_type=rng.choice(CARD_TYPES))),
        lambda: ("IBAN_CODE", f.iban()),
        lambda: ("IP_ADDRESS", f.ipv4() if rng.random() < 0.8 else f.ipv6()),
        lambda: ("US_SSN", f.ssn()),
    ]
    intros = ["Please update the record: ", "Customer note. ", "Forwarded message: ",
              "Hi team, "]
    links = [" and ", ", ", "; also ", ". Contact: ", " (see ", " - "]
    parts: list[str | tuple[str, str]] = [rng.choice(intros)]
    for i, make in enumerate(rng.sample(values, rng.randint(3, 5))):
        if i:
            parts.append(rng.choice(links))
        parts.append(make())
    parts.append(". " + f.paragraph(nb_sentences=rng.randint(3, 8)))
    return _build(parts, "en")


def _zh(f, en, rng: random.Random) -> LabelledText:
    cn_id = f.ssn()
    assert cn_resident_id_valid(cn_id)
    slots = [("我的身份证号是", ("CN_RESIDENT_ID", cn_id)),
             ("手机", ("PHONE_NUMBER", f.phone_number())),
             ("邮箱", ("EMAIL_ADDRESS", f.email())),
             ("服务器地址", ("IP_ADDRESS", f.ipv4())),
             ("银行卡", ("CREDIT_CARD", en.credit_card_number(card_type=rng.choice(CARD_TYPES))))]
    parts: list[str | tuple[str, str]] = ["您好，"]
    for label, value in rng.sample(slots, rng.randint(2, 4)):
        parts += [label, value, "，"]
    parts.append(f.paragraph(nb_sentences=rng.randint(2, 5)))
    return _build(parts, "zh")


def generate(n: int, seed: int = 0, name_locale: str | None = None) -> list[LabelledText]:
    """Every third prompt Chinese; ``name_locale`` (e.g. "de_DE") draws the English prompts'
    PERSON names from another Faker locale."""
    from faker import Faker

    Faker.seed(seed)
    rng = random.Random(seed)
    en, zh = Faker("en_US"), Faker("zh_CN")
    people = Faker(name_locale) if name_locale else None
    return [(_zh(zh, en, rng) if i % 3 == 2 else _en(en, rng, people)) for i in range(n)]


MIN_OVERLAP = 0.7  # of the gold span's characters ("Dr. Ann Lee DDS" vs "Ann Lee")


def _hit(a: tuple[int, int, str], b: tuple[int, int, str]) -> bool:
    overlap = min(a[1], b[1]) - max(a[0], b[0])
    return a[2] == b[2] and overlap >= MIN_OVERLAP * (a[1] - a[0])


def score(examples: list[LabelledText], detect: Callable[[str], list]) -> dict:
    """Per-entity recall/precision: a gold span is found when a prediction of the same entity
    covers >= 70% of it. Predictions of entities absent from the gold labels are ignored."""
    gold_entities = {e for ex in examples for *_, e in ex.spans}
    tp, gold, pred, hits = Counter(), Counter(), Counter(), Counter()
    for ex in examples:
        want = [tuple(s) for s in ex.spans]
        got = [(s.start, s.end, s.entity) for s in detect(ex.text) if s.entity in gold_entities]
        for w in want:
            gold[w[2]] += 1
            tp[w[2]] += any(_hit(w, g) for g in got)
        for g in got:
            pred[g[2]] += 1
            hits[g[2]] += any(_hit(w, g) for w in want)
    per = {e: {"gold": gold[e], "predicted": pred[e], "recall": tp[e] / gold[e] if gold[e] else 0,
               "precision": hits[e] / pred[e] if pred[e] else 0.0} for e in sorted(gold_entities)}
    total_pred = sum(pred.values())
    return {"examples": len(examples), "match": f"same entity, >= {MIN_OVERLAP:.0%} overlap",
            "entities": per, "micro_recall": sum(tp.values()) / sum(gold.values()),
            "micro_precision": sum(hits.values()) / total_pred if total_pred else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with open(args.out, "w", encoding="utf-8") as f:
        for ex in generate(args.n, args.seed):
            f.write(ex.to_json() + "\n")


if __name__ == "__main__":
    main()
