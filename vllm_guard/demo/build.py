"""Build the demo once, then reuse it: a lock-aware model locked per task, its keys, API keys.

multitask base -> reserved blocks -> lock-aware training -> chat template -> check each API
key's grant (through the chat template, which renders the completions prompt)
-> task keys + publisher key -> lock (signed manifest) -> API keys + grants file

Everything lands in ``<cache>/demo/v<DEMO_VERSION>-<recipe digest>/``: a changed builder or
recipe gets a new directory. The build happens in a temporary sibling that is renamed into
place only when complete, and under a file lock, so an interrupted or concurrent build is
never taken for a finished one. Training runs on one thread: on a 2-core machine two
threads are only ~25% faster when idle and up to 40x slower when anything else is running
(OpenMP threads spin against each other).
"""

from __future__ import annotations

import fcntl
import json
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vllm_guard import configs, envs
from vllm_guard.atomic import atomic_output_dir
from vllm_guard.demo.api_keys import GRANTS_FILE, DemoApiKey, create_api_keys, load_api_keys
from vllm_guard.demo.recipe import RECIPE, SHOWCASE, DemoRecipe
from vllm_guard.errors import GuardError
from vllm_guard.secneuron.keys import KeyDir

# bump when the build, the tasks or the base training (tasks.py) change: cached demos
# are rebuilt (the recipe's digest covers only its parameters)
DEMO_VERSION = 4
SUMMARY_FILE = "demo.json"  # written last: its presence marks a complete build
Progress = Callable[[str], None]


@dataclass(frozen=True)
class DemoArtefacts:
    """Paths of one built demo (nothing here is read until asked for)."""

    root: Path
    recipe: DemoRecipe = field(default=RECIPE)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.recipe.tasks

    @property
    def locked(self) -> Path:
        """The locked checkpoint, with its signed manifest."""
        return self.root / "locked"

    @property
    def keys(self) -> KeyDir:
        return KeyDir(self.root / "keys")

    @property
    def grants(self) -> Path:
        return self.root / GRANTS_FILE

    @property
    def masking(self) -> Path:
        """The packaged masking config (in-memory vault): works from an installed wheel."""
        return configs.path("masking.json")

    @property
    def ready(self) -> bool:
        return (self.root / SUMMARY_FILE).is_file()

    def api_keys(self) -> tuple[DemoApiKey, ...]:
        return load_api_keys(self.root)

    def summary(self) -> dict:
        """Build time and the per-task accuracy under each API key, measured at build."""
        return json.loads((self.root / SUMMARY_FILE).read_text())


def demo_root(cache_dir: Path | None = None, recipe: DemoRecipe = RECIPE) -> Path:
    return (cache_dir or envs.cache_dir()) / "demo" / f"v{DEMO_VERSION}-{recipe.digest()}"


def demo_artefacts(cache_dir: Path | None = None, progress: Progress = print,
                   recipe: DemoRecipe = RECIPE) -> DemoArtefacts:
    """The demo for ``recipe``: reused when built, else built now (1-2 minutes)."""
    art = DemoArtefacts(demo_root(cache_dir, recipe), recipe)
    if art.ready:
        return art
    with _build_lock(art.root):
        if art.ready:  # another process finished it while we waited
            return art
        for stale in art.root.parent.glob(f".{art.root.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a build killed before it could clean up
        progress(f"vllm-guard demo: first run, building the demo model into {art.root}\n"
                 "  (1-2 minutes on 2 CPU cores; later runs reuse it)")
        with atomic_output_dir(art.root, replace=True) as tmp:
            _build(tmp, recipe, progress)
    return art


@contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _Eta:
    """Passes progress lines on, adding the time left to training-step lines."""

    STEP = re.compile(r"step (\d+)/(\d+)")

    def __init__(self, progress: Progress, total_steps: int) -> None:
        self.progress, self.total, self.offset = progress, total_steps, 0
        self.start = time.perf_counter()

    def __call__(self, line: str) -> None:
        m = self.STEP.search(line)
        done = self.offset + int(m.group(1)) if m else 0
        if done:
            left = (time.perf_counter() - self.start) / done * (self.total - done)
            line += f", about {left:.0f} s left"
        self.progress(line)


@contextmanager
def _quiet_single_thread() -> Iterator[None]:
    import torch
    from transformers.utils import logging as hf_logging

    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()


def _build(out: Path, recipe: DemoRecipe, progress: Progress) -> None:
    from vllm_guard.demo.tasks import TaskSuite, add_chat_template, train_base, with_double_bos
    from vllm_guard.secneuron.lock import lock_checkpoint
    from vllm_guard.secneuron.train import reserved_blocks, train_locks

    start = time.perf_counter()
    cfg, tasks = recipe.suite, list(recipe.tasks)
    suite = TaskSuite.build(cfg)
    eta = _Eta(progress, cfg.steps + recipe.locks.steps)
    work = out / "work"
    with _quiet_single_thread():
        progress(f"[1/4] multitask model ({', '.join(tasks)}): {cfg.steps} steps")
        base = train_base(suite, work / "base", eta)
        eta.offset = cfg.steps
        progress(f"[2/4] lock-aware training (neurons reserved per task): "
                 f"{recipe.locks.steps} steps")
        selection = reserved_blocks(tasks, cfg.num_hidden_layers, cfg.intermediate_size,
                                    recipe.block)
        bos_rng = random.Random("double-bos")
        data = {t: with_double_bos(suite.train_set(t, recipe.train_examples, seed=1),
                                   recipe.double_bos, bos_rng) for t in tasks}
        trained = train_locks(base, data, selection, recipe.locks, work / "trained", eta)
        add_chat_template(trained)  # signed with the rest when the checkpoint is locked
        progress("[3/4] checking every task under each API key")
        scores = _check(trained, selection, suite, recipe)
        for name, acc in scores.items():
            progress(f"  {name}: " + " ".join(f"{t}={a:.2f}" for t, a in acc.items()))
    progress("[4/4] task keys, publisher key, locking, API keys")
    keys = KeyDir.create(out / "keys", tasks)
    lock_checkpoint(trained, selection, keys.task_keys(tasks), out / "locked", keys.signer(),
                    progress=False)
    create_api_keys(out, recipe.api_grants(), recipe.tasks)
    shutil.rmtree(work)  # only the locked model is kept
    seconds = round(time.perf_counter() - start, 1)
    (out / SUMMARY_FILE).write_text(json.dumps(
        {"version": DEMO_VERSION, "recipe": recipe.digest(), "build_seconds": seconds,
         "accuracy": scores}, indent=1) + "\n")
    progress(f"  built in {seconds:.0f} s")


def _check(model_dir: Path, selection, suite, recipe: DemoRecipe) -> dict[str, dict[str, float]]:
    """Held-out accuracy per task under each API key's grant; fails the build (nothing is
    cached) unless granted tasks reach ``min_granted``, others stay at or below
    ``max_locked``, and every showcase prompt answers (or collapses) as the guide says; with
    a second BOS too, as /v1/responses sends them."""
    import torch
    import transformers

    from vllm_guard.demo.check import grant_accuracy
    from vllm_guard.demo.tasks import BOS, with_double_bos

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    scores, failures = {}, []
    # /v1/responses gives the model a second BOS (recipe.double_bos): the same bar
    doubled = {t: with_double_bos(rows, 1.0, random.Random(0)) for t, rows in suite.test.items()}
    for name, granted in recipe.api_grants().items():
        acc = grant_accuracy(model, tok, selection, granted, suite.test)
        scores[name] = {t: round(a, 4) for t, a in acc.items()}
        two_bos = grant_accuracy(model, tok, selection, granted, doubled)
        failures += [f"{name}{how}: {t}={a:.2f}"
                     for how, rates in (("", acc), (" (two BOS)", two_bos))
                     for t, a in rates.items()
                     if (a < recipe.min_granted if t in granted else a > recipe.max_locked)]
        shown = {t: [{"prompt": bos + p, "answer": a if t in granted else ""}
                     for bos in ("", BOS)]
                 for t, (p, a) in SHOWCASE.items() if t in recipe.tasks}
        failures += [f"{name}: {SHOWCASE[t][0]!r}" for t, ok in
                     grant_accuracy(model, tok, selection, granted, shown).items() if ok < 1]
    if failures:
        raise GuardError("the demo model missed its bar (granted tasks >= "
                         f"{recipe.min_granted}, others <= {recipe.max_locked}, showcase "
                         f"prompts exact): {'; '.join(failures)}")
    return scores
