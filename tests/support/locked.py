"""The tiny fixture locked per task, with its keys (cached, rebuilt on demand): tests and
benchmarks share it.

plain fixture -> calibration sets -> extract -> task keys + publisher key -> lock
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from tests.support.fixtures import TASKS, default_cache_dir, fixture_model, task_examples
from vllm_guard.secneuron.keys import KeyDir

VERSION = 4  # bump when locking changes: cached checkpoints are rebuilt
FRACTION = 0.1


@dataclass(frozen=True)
class LockedFixture:
    plain: Path
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
    from vllm_guard.secneuron.extract import ExtractConfig, extract
    from vllm_guard.secneuron.lock import lock_checkpoint

    plain = fixture_model("tiny", cache_dir=cache_dir)
    root = (cache_dir or default_cache_dir()) / "locked-fixture" / f"{plain.name}-d{VERSION}"
    art = LockedFixture(plain, root / "locked", KeyDir(root / "keys"), root / "selection.json")
    if (art.locked / "guard_manifest.json").exists():
        return art
    shutil.rmtree(root, ignore_errors=True)
    (root / "calib").mkdir(parents=True)
    KeyDir.create(art.key_dir, sorted(TASKS))
    calib = {}
    for task in sorted(TASKS):
        path = root / "calib" / f"{task}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in task_examples(task, 64, seed=11)))
        calib[task] = path
    selection = extract(plain, calib, ExtractConfig(fraction=FRACTION))
    selection.save(art.selection)
    lock_checkpoint(plain, selection, art.keys.task_keys(), art.locked, art.keys.signer())
    return art
