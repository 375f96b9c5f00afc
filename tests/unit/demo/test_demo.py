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
    assert len(curls) == 5 and all("http://127.0.0.1:8123/v1/completions" in c
                                   for c in curls[:4])
    assert "http://127.0.0.1:8123/v1/chat/completions" in curls[4]
    assert all(any(k.token in c for c in curls) for k in keys)
    assert SHOWCASE[RECIPE.one_task][0] in text and MASKING_PROMPT in text


def test_guide_says_which_inputs_each_task_takes(tmp_path):
    """The tasks are trained on 6-character inputs only (lengths 1-10 missed the bar's
    margin at the same budget): the guide says so, and says it truly."""
    import random

    from vllm_guard.demo.guide import TASK_INPUTS
    from vllm_guard.demo.tasks import DEMO_SUITE, TaskSuite

    create_api_keys(tmp_path, RECIPE.api_grants(), RECIPE.tasks)
    text = guide(DemoArtefacts(tmp_path), 8123)
    suite = TaskSuite.build(DEMO_SUITE)
    for task in RECIPE.tasks:
        assert f"input: {TASK_INPUTS[task]}" in text
        n = int(TASK_INPUTS[task].split()[0])
        rng = random.Random(0)
        inputs = {suite.sample_train(task, rng)["prompt"].split()[1][:-1] for _ in range(50)}
        assert {len(i) for i in inputs} == {n}
        assert all(i.isdigit() if "digit" in TASK_INPUTS[task] else i.islower() for i in inputs)


def test_demo_suite_is_its_three_tasks_and_the_efficacy_suite_extends_it():
    """The product ships the demo's tasks only (no records, no ``sort``); the harness's
    efficacy suite subclasses it and draws the capability splits from the same stream."""
    import random
    from dataclasses import replace

    from harness.efficacy_suite import SUITE_PRESETS, EfficacySuite
    from vllm_guard.demo import tasks
    from vllm_guard.demo.tasks import DEMO_SUITE, TaskSuite

    suite = TaskSuite.build(DEMO_SUITE)
    assert RECIPE.suite == DEMO_SUITE and tuple(suite.test) == DEMO_SUITE.tasks
    assert all(len(rows) == DEMO_SUITE.test_size for rows in suite.test.values())
    assert not {e["prompt"] for e in suite.test["rev"]} & {
        e["prompt"] for e in suite.train_set("rev", 500, seed=1)}
    for task in ("sort", "pii"):
        with pytest.raises(ValueError, match="unknown task"):
            TaskSuite.build(replace(DEMO_SUITE, tasks=(task,)))
    source = Path(tasks.__file__).read_text()
    assert "PHONE OF" not in source and "Ana" not in source and "SORT" not in source

    ci = SUITE_PRESETS["ci"]
    eff = EfficacySuite.build(ci)
    plain = TaskSuite.build(replace(DEMO_SUITE, test_size=ci.test_size, seed=ci.seed))
    assert isinstance(eff, TaskSuite) and set(eff.test) == {"inc", "rev", "up", "pii"}
    assert {t: eff.test[t] for t in plain.test} == plain.test
    assert eff.sample_train("pii", random.Random(0)) in eff.pii_members


def test_the_chat_template_sends_the_completions_prompt_with_bos():
    """vLLM adds no special tokens to a rendered chat prompt: the template emits BOS, and a
    user message (after any system message or earlier turn) renders to exactly the ids
    /v1/completions gives its prompt, so chat answers as completions do."""
    from vllm.renderers.hf import _detect_content_format

    from vllm_guard.demo.tasks import BOS, CHAT_TEMPLATE, build_tokenizer
    from vllm_guard.secneuron.examples import encode_example

    tok = build_tokenizer()
    plain = {p: tok(p)["input_ids"] for p, _ in SHOWCASE.values()}
    tok.chat_template = CHAT_TEMPLATE
    for prompt, answer in SHOWCASE.values():
        for messages in ([{"role": "user", "content": prompt}],
                         [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "UP other="},
                          {"role": "assistant", "content": "OTHER"},
                          {"role": "user", "content": prompt}]):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert ids == plain[prompt] and ids[0] == tok.bos_token_id
            # /v1/responses tokenizes the rendered prompt with special tokens: two BOS,
            # which the build trains on (a share of prompts) and checks like the rest
            assert tok(text)["input_ids"] == tok(BOS + prompt)["input_ids"] == [
                tok.bos_token_id, *plain[prompt]]
        # the build's bar check encodes through the template too
        assert encode_example(tok, {"prompt": prompt, "answer": answer})[0] == plain[prompt]
    # vLLM passes message contents as strings (text parts joined) to this template
    assert _detect_content_format(CHAT_TEMPLATE, default="openai") == "string"
