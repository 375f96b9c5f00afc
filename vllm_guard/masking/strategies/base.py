"""A strategy turns a session's (entity, value, number) into the text the engine sees."""

from __future__ import annotations

import hashlib
import hmac
from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class Item:
    """One masked value of a session: its vault placeholder and what it stands for."""

    entity: str
    value: str
    number: int  # the placeholder's number: stable for the session's lifetime
    placeholder: str


class Strategy(ABC):
    name = ""
    entities: tuple[str, ...] = ()  # the entities it can render; () = all

    @abstractmethod
    def render(self, item: Item, session: bytes, attempt: int) -> str | None:
        """The stand-in for ``item`` (``attempt`` > 0 asks for another after a collision);
        None when this value cannot be rendered (it then falls back to its placeholder)."""


def session_seed(session: bytes, *parts: object) -> int:
    """A keyed 64-bit seed: unpredictable without the session's secret, stable within it."""
    msg = "\x00".join(str(p) for p in parts).encode()
    return int.from_bytes(hmac.new(session, msg, hashlib.sha256).digest()[:8], "big")
