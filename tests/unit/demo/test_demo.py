"""``vllm-guard demo`` without building or serving: help, the build cache's atomicity, the
API keys and the printed guide."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vllm_guard.demo import build
from vllm_guard.demo.api_keys import GRANTS_FILE, TOKENS_FILE, create_api_keys
from vllm_guard.demo.build import DemoArtefacts, demo_artefacts
from vllm_guard.demo.guide import MASKING_PROMPT, guide
from vllm_guard.demo.recipe import ALL_KEY, ONE_KEY, RECIPE, SHOWCASE
from vllm_guard.errors import GuardError
from vllm_guard.grants.credentials import Authenticator


def test_demo_help():
    out = subprocess.run([sys.executable, "-m", "vllm_guard.cli", "demo", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--port" in out.stdout and "--no-serve" in out.stdout


def test_an_interrupted_build_is_never_reused(tmp_path, monkeypatch):
    calls = []

    def failing(out: Path, recipe, progress) -> None:
        (out / "locked").mkdir()
        raise GuardError("interrupted")

    def working(out: Path, recipe, progress) -> None:
        calls.append(out)
        (out / build.SUMMARY_FILE).write_text("{}")

    monkeypatch.setattr(build, "_build", failing)
    with pytest.raises(GuardError):
        demo_artefacts(tmp_path, progress=lambda _: None)
    root = build.demo_root(tmp_path)
    assert not root.exists() and not list(root.parent.glob(".*partial*"))
    stale = root.parent / f".{root.name}.partial-killed"  # as a SIGKILLed build leaves it
    stale.mkdir()
    monkeypatch.setattr(build, "_build", working)
    for _ in range(2):
        art = demo_artefacts(tmp_path, progress=lambda _: None)
    assert art.ready and art.root == root and len(calls) == 1  # built once, then reused
    assert not stale.exists()


def test_api_keys_are_private_and_only_their_hashes_are_granted(tmp_path):
    keys = create_api_keys(tmp_path, RECIPE.api_grants(), RECIPE.tasks)
    assert (tmp_path / TOKENS_FILE).stat().st_mode & 0o777 == 0o600
    grants = (tmp_path / GRANTS_FILE).read_text()
    auth = Authenticator(tmp_path / GRANTS_FILE)
    for key in keys:
        assert key.token not in grants and key.token not in repr(key)
        assert auth.authenticate(f"Bearer {key.token}").tasks == set(key.tasks)
    assert {k.name: k.tasks for k in keys} == {ALL_KEY: RECIPE.tasks,
                                               ONE_KEY: (RECIPE.one_task,)}


def test_guide_prints_a_curl_per_key_and_for_masking(tmp_path):
    art = DemoArtefacts(tmp_path)
    keys = create_api_keys(tmp_path, RECIPE.api_grants(), RECIPE.tasks)
    text = guide(art, 8123)
    curls = [line for line in text.splitlines() if line.startswith("curl ")]
    assert len(curls) == 4 and all("http://127.0.0.1:8123/v1/completions" in c for c in curls)
    assert all(any(k.token in c for c in curls) for k in keys)
    assert SHOWCASE[RECIPE.one_task][0] in text and MASKING_PROMPT in text
