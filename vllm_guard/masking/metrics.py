"""One counter for the whole masking package: masked_<ENTITY>, unknown_placeholders,
vault_unavailable, standin_fallback_<ENTITY>."""

from __future__ import annotations

from collections import Counter

METRICS: Counter[str] = Counter()
