"""``grants-add-key`` accepts only task names it can check (against ``--model``'s manifest, or
else the grants file's own ``tasks``), and a key with no task only when asked for with
``--public-only``: a key granted ``bogus`` or nothing silently got public-only answers."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.unit.cli.test_preflight import refused
from tests.unit.secneuron.test_signed_checkpoint import locked  # noqa: F401 (fixture)


def add_key(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vllm_guard.cli", "grants-add-key",
                           *map(str, args)], capture_output=True, text=True, timeout=60)


def test_unknown_or_missing_tasks_are_refused(locked, tmp_path):  # noqa: F811
    grants = tmp_path / "grants.json"
    base = ["grants-add-key", "--file", grants, "--name", "alice"]
    line = refused(*base, "--task", "bogus", "--model", locked)
    assert "'bogus'" in line and "['add', 'capital', 'reverse']" in line, line
    assert "--public-only" in refused(*base, "--model", locked)  # no task: the hint
    assert "pass --model" in refused(*base, "--task", "add")  # nothing to check the name against
    assert "no guard_manifest.json" in refused(*base, "--task", "add", "--model", tmp_path)
    assert not grants.exists()
    ok = add_key(*base[1:], "--task", "add", "--model", locked)
    assert ok.returncode == 0, ok.stderr
    assert [k["tasks"] for k in json.loads(grants.read_text())["api_keys"]] == [["add"]]


def test_model_is_optional_when_the_file_lists_its_tasks(tmp_path):
    grants = tmp_path / "grants.json"
    grants.write_text(json.dumps({"mode": "required", "tasks": ["add", "capital"],
                                  "api_keys": [], "revoked": []}))
    base = ["--file", grants]
    ok = add_key(*base, "--name", "bob", "--task", "capital")
    assert ok.returncode == 0, ok.stderr
    line = refused("grants-add-key", *base, "--name", "eve", "--task", "bogus")
    assert "'bogus'" in line and "['add', 'capital']" in line, line


def test_a_key_with_no_task_needs_public_only(tmp_path):
    grants = tmp_path / "grants.json"
    base = ["--file", grants, "--name", "pub"]
    assert "--public-only" in refused("grants-add-key", *base)
    assert "one or the other" in refused("grants-add-key", *base, "--public-only", "--task",
                                         "add")
    ok = add_key(*base, "--public-only")
    assert ok.returncode == 0 and "public-only" in ok.stdout, ok.stderr
    from vllm_guard.grants.credentials import GrantsConfig

    assert [k.tasks for k in GrantsConfig.load(str(grants)).api_keys] == [frozenset()]
