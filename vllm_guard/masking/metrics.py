"""One counter for the whole masking package: masked_<ENTITY>, unknown_placeholders,
unrestored_stand_ins (a literal stand-in glued to a word, left as written), vault_unavailable,
standin_fallback_<ENTITY>."""

from __future__ import annotations

from collections import Counter

METRICS: Counter[str] = Counter()
