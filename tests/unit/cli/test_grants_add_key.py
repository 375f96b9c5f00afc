"""``grants-add-key`` accepts only task names the checkpoint knows, and at least one: a key
granted ``bogus`` or nothing silently got public-only answers."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.unit.cli.test_preflight import refused
from tests.unit.secneuron.test_signed_checkpoint import locked  # noqa: F401 (fixture)


def test_unknown_or_missing_tasks_are_refused(locked, tmp_path):  # noqa: F811
    grants = tmp_path / "grants.json"
    base = ["grants-add-key", "--file", grants, "--name", "alice"]
    line = refused(*base, "--task", "bogus", "--model", locked)
    assert "'bogus'" in line and "['add', 'capital', 'reverse']" in line, line
    assert "at least one --task" in refused(*base, "--model", locked)
    assert "--model" in refused(*base, "--task", "add")  # nothing to check the name against
    assert "no guard_manifest.json" in refused(*base, "--task", "add", "--model", tmp_path)
    assert not grants.exists()
    ok = subprocess.run([sys.executable, "-m", "vllm_guard.cli", *map(str, base), "--task",
                         "add", "--model", str(locked)], capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert [k["tasks"] for k in json.loads(grants.read_text())["api_keys"]] == [["add"]]
