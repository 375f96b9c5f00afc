"""Batched encoding gives exactly the ids one example at a time gives (as the server does)."""

from __future__ import annotations

import random

from vllm_guard.demo.tasks import build_tokenizer
from vllm_guard.secneuron.examples import AnswerBatcher, encode_example


def test_batched_encoding_matches_one_at_a_time():
    tok = build_tokenizer()
    rng = random.Random(0)
    alphabet = "abcXYZ 0123=é中"
    batch = [{"prompt": "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))),
              "answer": "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))}
             for _ in range(50)]
    batch += batch[:5]  # repeats come from the cache
    batcher = AnswerBatcher(tok)
    ids, labels = batcher.encode(batch)
    for ex in batch:
        assert batcher.ids(ex) == encode_example(tok, ex), ex
    one = AnswerBatcher(tok)
    one._fill = lambda batch: None  # the one-at-a-time path
    ids1, labels1 = one.encode(batch)
    assert ids.equal(ids1) and labels.equal(labels1)
