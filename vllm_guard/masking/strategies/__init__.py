"""What the engine sees in place of a sensitive value, per entity: ``placeholder``
(``<PERSON_1>``, the default), ``surrogate`` (a realistic stand-in) or ``fpe`` (FF3-1 of a
digit-structured value). The vault keeps placeholder -> value either way; the stand-ins are
derived from it per session, so every strategy shares the vault's session rules.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING

from vllm_guard.masking.metrics import METRICS
from vllm_guard.masking.strategies.base import Item, Strategy
from vllm_guard.masking.strategies.fpe import FpeStrategy
from vllm_guard.masking.strategies.placeholder import PlaceholderStrategy
from vllm_guard.masking.strategies.surrogate import SurrogateStrategy
from vllm_guard.masking.types import PLACEHOLDER
from vllm_guard.masking.vault import load_env_key

if TYPE_CHECKING:
    from vllm_guard.masking.config import MaskingConfig

STRATEGY_NAMES = ("placeholder", "surrogate", "fpe")
SUPPORTED: dict[str, tuple[str, ...]] = {
    "placeholder": (), "surrogate": SurrogateStrategy.entities, "fpe": FpeStrategy.entities}
MAX_ATTEMPTS = 8  # redraws of a surrogate that collides with a value or another stand-in


def check_strategies(strategies: Mapping[str, str]) -> None:
    """Raise ValueError (naming the key) for an unknown strategy or an unsupported entity."""
    for entity, name in strategies.items():
        if name not in STRATEGY_NAMES:
            raise ValueError(f"unknown strategy {name!r} for {entity} (known: "
                             f"{list(STRATEGY_NAMES)})")
        if SUPPORTED[name] and entity not in SUPPORTED[name]:
            raise ValueError(f"strategy {name!r} does not handle {entity} (it handles "
                             f"{list(SUPPORTED[name])})")


class StandIns:
    """Per session: placeholder -> the text the engine sees. Stand-ins are unique in the
    session and never equal to any of its real values; the same (entity, number) keeps its
    stand-in unless a value that arrives later equals it (the real value wins, the stand-in
    is redrawn)."""

    def __init__(self, strategies: Mapping[str, str], fpe_key: bytes | None = None):
        check_strategies(strategies)
        placeholder = PlaceholderStrategy()
        made: dict[str, Strategy] = {"placeholder": placeholder,
                                     "surrogate": SurrogateStrategy()}
        if "fpe" in strategies.values():
            if fpe_key is None:
                raise ValueError("the fpe strategy needs a key")
            made["fpe"] = FpeStrategy(fpe_key)
        self.by_entity = {e: made[n] for e, n in strategies.items() if n != "placeholder"}
        self.placeholder = placeholder
        self._render = functools.lru_cache(maxsize=65_536)(self._render_uncached)

    @property
    def only_placeholders(self) -> bool:
        return not self.by_entity

    @staticmethod
    def session_secret(namespace: str) -> bytes:
        # the namespace is a MAC under the server's session key: secret, and equal on replicas
        return hmac.new(namespace.encode(), b"vllm-guard stand-ins", hashlib.sha256).digest()

    def _render_uncached(self, strategy: Strategy, item: Item, session: bytes,
                         attempt: int) -> str | None:
        return strategy.render(item, session, attempt)

    def table(self, namespace: str, mapping: Mapping[str, str]) -> dict[str, str]:
        """placeholder -> stand-in for every entry of the session's ``mapping``."""
        if self.only_placeholders:
            return {ph: ph for ph in mapping}
        session = self.session_secret(namespace)
        used = set(mapping.values())
        out: dict[str, str] = {}
        items = []
        for ph, value in mapping.items():
            m = PLACEHOLDER.fullmatch(ph)
            items.append(Item(m.group(1), value, int(m.group(2)), ph) if m else None)
        for item in sorted((i for i in items if i), key=lambda i: (i.entity, i.number)):
            out[item.placeholder] = self.pick(item, session, used)
        return out

    def pick(self, item: Item, session: bytes, used: set[str]) -> str:
        """``item``'s stand-in: the first draw not in ``used`` (real values and stand-ins
        taken), else its placeholder. Adds it to ``used``."""
        strategy = self.by_entity.get(item.entity, self.placeholder)
        stand_in = None
        for attempt in range(MAX_ATTEMPTS):
            got = self._render(strategy, item, session, attempt)
            if got is None or got not in used:
                stand_in = got
                break
        if stand_in is None:
            if strategy is not self.placeholder:
                METRICS[f"standin_fallback_{item.entity}"] += 1
            stand_in = item.placeholder
        used.add(stand_in)
        return stand_in


def make_stand_ins(config: MaskingConfig) -> StandIns:
    """The config's strategies; the fpe key from its environment variable (one-line error)."""
    fpe = "fpe" in config.strategies.values()
    key = load_env_key(config.fpe_key_env, "the masking fpe strategy") if fpe else None
    return StandIns(config.strategies, key)
