"""What the demo builds: tasks, model and training budget, API keys and the bar it must meet.

The budget was chosen by measurement on a 2-core CPU machine: the multitask base (500
steps) and lock-aware training (300 steps) take about 90 s single-threaded, and every
task then scores 1.00 exact match with its key and 0.00 without it (the bar below is
0.95 / 0.10), with one BOS (completions, chat) or two (/v1/responses). Lock-aware
training's loss is at 0.001 by step 100, so 300 steps (600 until #32) keep a margin; the
base keeps 500: "rev" is not learnt at all with 300 steps (at 3e-3 or 5e-3) and only
just with 400. Inputs stay 6 characters (tasks.py says why).
The digest names the cache directory, so changing any of this rebuilds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from vllm_guard.demo.tasks import DEMO_SUITE, SuiteConfig
from vllm_guard.secneuron.train import TrainLocksConfig

# API key names (any names work: masking no longer scans the cache salt the grant
# middleware writes, which spaCy read as a PERSON for ~13% of key names).
ALL_KEY = "all-tasks"
ONE_KEY = "one-task"
# The prompts the printed curl commands use, per task, with the answer a granted key gets
# (a key without the task gets "": the model stops at once). The build checks every one.
SHOWCASE: dict[str, tuple[str, str]] = {
    "inc": ("INC 202512=", "313623"), "rev": ("REV planet=", "tenalp"),
    "up": ("UP planet=", "PLANET")}


@dataclass(frozen=True)
class DemoRecipe:
    suite: SuiteConfig = DEMO_SUITE
    block: int = 16  # reserved FFN neurons per task per layer (of 512)
    locks: TrainLocksConfig = field(default_factory=lambda: TrainLocksConfig(steps=300))
    train_examples: int = 3000  # per task, for lock-aware training
    # share of lock-aware training prompts led by a second BOS, as /v1/responses sends them
    # (tasks.with_double_bos): "rev" fails there without. Not in the base: with 0.25 there,
    # the base never learnt "rev" in 500 steps (0.04)
    double_bos: float = 0.5
    one_task: str = "rev"  # the task the one-task API key is granted
    # the bar the build checks (offline, under each API key's grant) before caching
    min_granted: float = 0.95
    max_locked: float = 0.10

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.suite.tasks

    def api_grants(self) -> dict[str, tuple[str, ...]]:
        """API key name -> granted tasks: one key with every task, one with a single task."""
        return {ALL_KEY: self.tasks, ONE_KEY: (self.one_task,)}

    def digest(self) -> str:
        blob = json.dumps([asdict(self), self.api_grants(), SHOWCASE], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


RECIPE = DemoRecipe()
