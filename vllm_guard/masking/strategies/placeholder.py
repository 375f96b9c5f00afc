"""``<ENTITY_N>``: the vault's own name for the value (the default)."""

from __future__ import annotations

from vllm_guard.masking.strategies.base import Item, Strategy


class PlaceholderStrategy(Strategy):
    name = "placeholder"

    def render(self, item: Item, session: bytes, attempt: int) -> str | None:
        return item.placeholder if attempt == 0 else None
