"""The soak's own checks (harness/soak_check.py): each must see what it is there to count."""

from __future__ import annotations

import random

from harness.soak_check import (
    Outcome,
    Prompt,
    Tally,
    ValueIndex,
    Window,
    check_reply,
    luhn,
    make_prompt,
    principal_values,
)

VALUES = {p: principal_values(p) for p in range(8)}
INDEX = ValueIndex.of(VALUES)
MINE = VALUES[3]["email"][7]
PROMPT = Prompt(f"Mail {MINE}, please", (MINE,))


def test_a_reply_with_another_principals_value_is_counted():
    theirs = VALUES[5]["card"][2]
    v = check_reply(PROMPT, PROMPT.text + theirs[:3], 3, INDEX)
    assert v.foreign == () and not v.wrong and v.restored == 1  # a fragment is nothing
    v = check_reply(PROMPT, PROMPT.text + " " + theirs, 3, INDEX)
    assert v.foreign == (theirs,)
    # the same value is the principal's own under principal 5
    assert check_reply(Prompt(theirs, (theirs,)), theirs, 5, INDEX).foreign == ()


def test_a_wrong_or_missing_restoration_is_counted():
    other = VALUES[3]["email"][8]  # the same principal's other value: wrong, not foreign
    for reply in (f"Mail {other}, please", "Mail <EMAIL_ADDRESS_1>, please",
                  PROMPT.text + "<PHONE_NUMBER_2>", ""):
        v = check_reply(PROMPT, reply, 3, INDEX)
        assert v.wrong and v.restored == 0 and v.foreign == (), reply


def test_values_are_unique_detectable_shapes_and_prompts_fit_the_model():
    every = [v for kinds in VALUES.values() for vs in kinds.values() for v in vs]
    assert len(set(every)) == len(every)
    assert not any(a != b and a in b for a in every for b in every)
    assert all(luhn(c[:-1]) == c and len(c) == 16 for c in VALUES[0]["card"])
    rng = random.Random(0)
    for _ in range(200):
        p = make_prompt(VALUES[1], rng)
        assert all(v in p.text for v in p.values)
        masked = p.text
        for v in p.values:
            masked = masked.replace(v, "<EMAIL_ADDRESS_99>")  # the longest placeholder
        assert len(masked) + 1 + 4 <= 64  # BOS + max_tokens within the demo's positions


def test_tally_tells_expected_503s_from_failures():
    down = Window("redis down", 10.0, 15.0)
    t = Tally()
    t.add(Outcome("client", 0.0, 0.5, 200))
    t.add(Outcome("client", 9.0, 12.0, 503, "vault_unavailable"))  # while down: expected
    t.add(Outcome("malformed:not json", 11.0, 11.1, 400, "invalid_json"))
    assert t.held(down) == ["no restoration was checked"]
    t.check(check_reply(PROMPT, PROMPT.text, 3, INDEX))
    assert t.held(down) == []
    assert t.summary(down)["non_2xx_by_cause"] == {
        "client 503 vault_unavailable (Redis down)": 1, "malformed 400 invalid_json": 1}
    t.add(Outcome("client", 20.0, 20.1, 503, "vault_unavailable"))  # after it was back
    t.add(Outcome("client", 12.0, 12.2, 500, "InternalServerError"))  # while down, but a 500
    t.add(Outcome("client", 30.0, 150.0, None, "timeout"))
    t.check(check_reply(PROMPT, PROMPT.text + VALUES[1]["phone"][0], 3, INDEX))
    s = t.summary(down)
    assert (s["unexpected_5xx"], s["5xx_after_redis_back"], s["requests_without_an_answer"],
            s["cross_principal_values_seen"]) == (2, 1, 1, 1)
    assert t.held(down) == ["cross-principal values seen: 1",
                            "5xx other than 503 while Redis was down: 2",
                            "5xx after Redis was back: 1", "requests without an answer: 1"]
