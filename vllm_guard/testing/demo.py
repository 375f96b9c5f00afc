"""Demo artefacts: the tiny fixture, locked per task, with its keys (cached, rebuilt on demand).

plain fixture -> calibration sets -> extract -> task keys + publisher key -> lock
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from vllm_guard.testing.fixtures import TASKS, default_cache_dir, fixture_model, task_examples

DEMO_VERSION = 2
FRACTION = 0.1


@dataclass(frozen=True)
class LockedFixture:
    plain: Path
    locked: Path
    key_dir: Path
    publisher_pub: Path
    selection: Path

    def key(self, task: str) -> Path:
        return self.key_dir / f"{task}.key"

    def loader_config(self, tasks: list[str] | None = None) -> dict:
        tasks = sorted(TASKS) if tasks is None else tasks
        return {"keys": [str(self.key(t)) for t in tasks],
                "publisher_key": str(self.publisher_pub)}


def locked_fixture(cache_dir: Path | None = None) -> LockedFixture:
    """The locked tiny fixture with one key per synthetic task (built once, then cached)."""
    from vllm_guard.secneuron.extract import ExtractConfig, extract
    from vllm_guard.secneuron.keys import (
        TaskKey,
        generate_signing_key,
        load_signing_key,
        load_task_keys,
        save_task_key,
    )
    from vllm_guard.secneuron.lock import lock_checkpoint

    plain = fixture_model("tiny", cache_dir=cache_dir)
    root = (cache_dir or default_cache_dir()) / "demo" / f"{plain.name}-d{DEMO_VERSION}"
    art = LockedFixture(plain, root / "locked", root / "keys", root / "keys" / "publisher.pub",
                        root / "selection.json")
    if (art.locked / "guard_manifest.json").exists():
        return art
    shutil.rmtree(root, ignore_errors=True)
    (root / "calib").mkdir(parents=True)
    calib = {}
    for task in sorted(TASKS):
        path = root / "calib" / f"{task}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in task_examples(task, 64, seed=11)))
        calib[task] = path
        save_task_key(TaskKey.generate(task), art.key(task))
    generate_signing_key(root / "keys" / "publisher.pem")
    selection = extract(plain, calib, ExtractConfig(fraction=FRACTION))
    selection.save(art.selection)
    lock_checkpoint(plain, selection, load_task_keys([art.key_dir]), art.locked,
                    load_signing_key(root / "keys" / "publisher.pem"))
    return art


def demo_server_args(port: int) -> list[str]:
    """vLLM arguments that serve the locked demo model, all demo keys loaded, on loopback."""
    art = locked_fixture()
    return ["--model", str(art.locked), "--served-model-name", "demo", "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "float32", "--max-model-len", "512",
            "--enforce-eager", "--gpu-memory-utilization", "0.1",
            "--load-format", "secneuron",
            "--model-loader-extra-config", json.dumps(art.loader_config())]
