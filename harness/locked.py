"""The tiny fixture locked per task, with its keys (cached, rebuilt on demand): tests and
benchmarks share it.

plain fixture -> calibration sets -> extract -> + a sealed capability (heads and neurons of
its own, random: ``SEALED_TASK``) -> task keys + publisher key -> lock
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import vllm_guard.secneuron as secneuron
from harness.cache import cache_key, cached_build
from harness.fixtures import TASKS, default_cache_dir, fixture_model, task_examples
from vllm_guard.secneuron.keys import KeyDir
from vllm_guard.secneuron.selection import Selection

# What the locked fixture depends on: its builder, the fixture builder, the lock toolchain.
SOURCES = (Path(__file__), Path(__file__).with_name("fixtures.py"), Path(secneuron.__file__).parent)
FRACTION = 0.1
# A sealed capability (#35) beside the extracted locks: 2 KV heads and the 4 query heads that
# read them (tiny: 4 heads on 2 KV heads), 32 FFN neurons, per layer. Random, not trained:
# the servers must mask them per request, which only needs them to change the output.
SEALED_TASK = "sealed"
SEALED_HEADS, SEALED_NEURONS, SEALED_OUT_STD = 4, 32, 0.5


@dataclass(frozen=True)
class LockedFixture:
    plain: Path  # the trained tiny fixture
    unlocked: Path  # what was locked: plain + the sealed capability (the references' model)
    locked: Path
    keys: KeyDir
    selection: Path

    @property
    def key_dir(self) -> Path:
        return self.keys.root

    @property
    def publisher_pub(self) -> Path:
        return self.keys.public_key

    def key(self, task: str) -> Path:
        return self.keys.key_file(task)

    def loader_config(self, tasks: list[str] | None = None) -> dict:
        return self.keys.loader_config(sorted(TASKS) if tasks is None else tasks)


def locked_fixture(cache_dir: Path | None = None) -> LockedFixture:
    """The locked tiny fixture with one key per synthetic task (built once, then cached)."""
    plain = fixture_model("tiny", cache_dir=cache_dir)
    key = cache_key({"plain": plain.name, "fraction": FRACTION}, SOURCES)
    root = cached_build((cache_dir or default_cache_dir()) / "locked-fixture",
                        f"{plain.name}-{key}", lambda out: _build(plain, out))
    return _artefacts(plain, root)


def _artefacts(plain: Path, root: Path) -> LockedFixture:
    return LockedFixture(plain, root / "unlocked", root / "locked", KeyDir(root / "keys"),
                         root / "selection.json")


def _build(plain: Path, root: Path) -> None:
    import torch

    from vllm_guard.secneuron.capability import SealConfig, seal_random
    from vllm_guard.secneuron.extract import ExtractConfig, extract
    from vllm_guard.secneuron.lock import lock_checkpoint

    art = _artefacts(plain, root)
    (root / "calib").mkdir(parents=True)
    KeyDir.create(art.key_dir, [*sorted(TASKS), SEALED_TASK])
    calib = {}
    for task in sorted(TASKS):
        path = root / "calib" / f"{task}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in task_examples(task, 64, seed=11)))
        calib[task] = path
    extracted = extract(plain, calib, ExtractConfig(fraction=FRACTION))
    seal_random(plain, SEALED_TASK, SealConfig(heads=SEALED_HEADS, neurons=SEALED_NEURONS),
                art.unlocked, torch.Generator().manual_seed(7), out_std=SEALED_OUT_STD)
    selection = with_capabilities(extracted, Selection.load(art.unlocked / "lock_selection.json"))
    selection.save(art.selection)
    lock_checkpoint(art.unlocked, selection, art.keys.task_keys(), art.locked,
                    art.keys.signer())


def with_capabilities(selection: Selection, sealed: Selection) -> Selection:
    """``selection`` (neurons of a model) plus the sealed capabilities' selection of the same
    model widened by them (their neurons are new indices, their heads new columns)."""
    layers = sorted(set(selection.neurons) | set(sealed.neurons))
    return Selection([*selection.tasks, *(t for t in sealed.tasks if t not in selection.tasks)],
                     {layer: {**selection.neurons.get(layer, {}), **sealed.neurons.get(layer, {})}
                      for layer in layers},
                     {**selection.info, "capabilities": sealed.info},
                     attn=sealed.attn, kv=sealed.kv)
