"""The soak benchmark's bookkeeping (``python -m benchmarks.soak``): each principal's own
sensitive values, the prompts that carry them, the check of every reply against what was
sent, and the tally that says whether the run held.

Kept apart from the benchmark (which starts servers) so a unit test can show that each check
fails when it should: a reply holding another principal's value, an echo not restored, a
5xx outside the Redis outage, a request left without an answer.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field

from harness.measure import percentile

PLACEHOLDER = re.compile(r"<[A-Z][A-Z_]*_[0-9]+>")
# what each template holds; the masked prompt (placeholders of up to 21 characters) plus BOS
# and max_tokens must fit the demo model's 64 positions
TEMPLATES: tuple[tuple[str, ...], ...] = (
    ("Mail {email}, please", "email"), ("Call {phone} now", "phone"),
    ("Card {card} ok", "card"), ("Mail {email} or {phone}", "email", "phone"),
    ("Card {card}, mail {email}", "card", "email"))


def luhn(body: str) -> str:
    """``body`` with its Luhn check digit appended (a card number the detector accepts)."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        n = int(ch) * (2 if i % 2 == 0 else 1)
        total += n - 9 if n > 9 else n
    return body + str((10 - total % 10) % 10)


def principal_values(principal: int, per_kind: int = 30) -> dict[str, list[str]]:
    """Values only ``principal`` ever sends: the principal's number is in each, at a fixed
    width, so no value is a substring of another principal's."""
    assert 0 <= principal <= 9 and per_kind <= 1000
    return {"email": [f"u{principal}k{k:03d}@p{principal}.soak.example.org"
                      for k in range(per_kind)],
            "phone": [f"+1 415 555 {principal}{k:03d}" for k in range(per_kind)],
            "card": [luhn(f"4{principal}{k:03d}" + "0" * 10) for k in range(per_kind)]}


@dataclass(frozen=True)
class Prompt:
    text: str
    values: tuple[str, ...]  # the sensitive values it holds


def make_prompt(values: dict[str, list[str]], rng: random.Random) -> Prompt:
    template, *kinds = rng.choice(TEMPLATES)
    chosen = {k: rng.choice(values[k]) for k in kinds}
    return Prompt(template.format(**chosen), tuple(chosen.values()))


class ValueIndex:
    """Finds every known value in a text and says whose it is (one regex pass)."""

    def __init__(self, owners: dict[str, int]):
        self.owners = owners
        alternatives = sorted(owners, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, alternatives)))

    @classmethod
    def of(cls, principals: dict[int, dict[str, list[str]]]) -> ValueIndex:
        return cls({v: p for p, kinds in principals.items() for vs in kinds.values()
                    for v in vs})

    def foreign(self, text: str, principal: int) -> list[str]:
        """Values of any other principal found in ``text``."""
        return [m.group() for m in self.pattern.finditer(text)
                if self.owners[m.group()] != principal]


@dataclass(frozen=True)
class Verdict:
    restored: int  # values whose restoration was checked and right
    wrong: bool  # the echo is not what was sent (a value not restored or restored wrong)
    foreign: tuple[str, ...]  # other principals' values in the reply


def check_reply(prompt: Prompt, reply: str, principal: int, index: ValueIndex) -> Verdict:
    """A completions reply with ``echo``: it must start with the prompt exactly as sent
    (every placeholder restored to this session's value) and hold no placeholder of ours
    and no other principal's value anywhere."""
    echoed_ok = reply.startswith(prompt.text)
    leftover = PLACEHOLDER.search(reply) is not None
    wrong = not echoed_ok or leftover
    return Verdict(0 if wrong else len(prompt.values), wrong,
                   tuple(index.foreign(reply, principal)))


@dataclass
class Outcome:
    """One request: when it started and ended (seconds from the run's start), what came
    back, and why."""

    kind: str  # "client", "malformed:<what>", "handover"
    start: float
    end: float
    status: int | None  # None: no answer at all (timeout, reset, stream cut short)
    cause: str = ""  # error code or type from the body, or why there was no answer
    server: str = ""  # which API process answered, when known


@dataclass
class Window:
    """A fault's time span (seconds from the run's start)."""

    name: str
    start: float
    end: float

    def holds(self, t: float, grace: float = 0.0) -> bool:
        return self.start <= t <= self.end + grace


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds)
    restorations: int = 0
    wrong_restorations: int = 0
    cross_principal: list[str] = field(default_factory=list)
    checked_replies: int = 0

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        if outcome.kind == "client" and outcome.status == 200:
            self.latencies.append((outcome.start, outcome.end - outcome.start))

    def check(self, verdict: Verdict) -> None:
        self.checked_replies += 1
        self.restorations += verdict.restored
        self.wrong_restorations += verdict.wrong
        self.cross_principal += verdict.foreign

    def classify(self, redis_down: Window | None, grace: float = 1.0) -> dict[str, int]:
        """Every non-2xx by cause; a 503 from the vault while Redis was down (ending within
        ``grace`` seconds of its return) is expected, any other 5xx is not."""
        causes: Counter[str] = Counter()
        for o in self.outcomes:
            if o.status is not None and 200 <= o.status < 300:
                continue
            status = "no answer" if o.status is None else str(o.status)
            tag = f"{o.kind.split(':')[0]} {status} {o.cause}".strip()
            if o.status is not None and o.status >= 500:
                during = redis_down is not None and redis_down.holds(o.end, grace)
                expected = o.status == 503 and o.cause == "vault_unavailable" and during
                tag += " (Redis down)" if expected else (
                    " (while Redis was down)" if during else "")
            causes[tag] += 1
        return dict(sorted(causes.items()))

    def unexpected_5xx(self, redis_down: Window | None, grace: float = 1.0) -> int:
        return sum(1 for o in self.outcomes if o.status is not None and o.status >= 500
                   and not (o.status == 503 and o.cause == "vault_unavailable"
                            and redis_down is not None and redis_down.holds(o.end, grace)))

    def after(self, t: float) -> list[Outcome]:
        return [o for o in self.outcomes if o.start > t]

    def lost(self) -> int:
        return sum(1 for o in self.outcomes if o.status is None)

    def summary(self, redis_down: Window | None, grace: float = 1.0) -> dict:
        secs = [s for _, s in self.latencies]
        back = redis_down.end if redis_down else float("inf")
        return {
            "requests": len(self.outcomes),
            "client_requests": sum(o.kind == "client" for o in self.outcomes),
            "client_2xx": len(self.latencies),
            "malformed_requests": sum(o.kind.startswith("malformed") for o in self.outcomes),
            "latency_p50_ms": round(percentile(secs, 50) * 1000, 1),
            "latency_p99_ms": round(percentile(secs, 99) * 1000, 1),
            "non_2xx_by_cause": self.classify(redis_down, grace),
            "replies_checked": self.checked_replies,
            "restorations_checked": self.restorations,
            "wrong_restorations": self.wrong_restorations,
            "cross_principal_values_seen": len(self.cross_principal),
            "unexpected_5xx": self.unexpected_5xx(redis_down, grace),
            "5xx_after_redis_back": sum(1 for o in self.after(back + grace)
                                        if o.status is not None and o.status >= 500),
            "requests_without_an_answer": self.lost(),
        }

    def held(self, redis_down: Window | None, grace: float = 1.0) -> list[str]:
        """The must-hold lines that failed (empty: the run held)."""
        s = self.summary(redis_down, grace)
        checks = {"cross-principal values seen": s["cross_principal_values_seen"],
                  "wrong restorations": s["wrong_restorations"],
                  "5xx other than 503 while Redis was down": s["unexpected_5xx"],
                  "5xx after Redis was back": s["5xx_after_redis_back"],
                  "requests without an answer": s["requests_without_an_answer"]}
        failed = [f"{k}: {v}" for k, v in checks.items() if v]
        if not s["restorations_checked"]:
            failed.append("no restoration was checked")
        return failed
