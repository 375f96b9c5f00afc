"""Re-learning attacks and the collapse trap, CI size (the full sweep is
``python -m benchmarks.efficacy --relearn``).

Direction of the effect on the CI suite: an attacker holding every key but ``rev`` fine-tunes
the public weights on 100 ``rev`` examples. With the trap, the attacked model is worse at
``rev`` or at the open tasks than without it; benign tuning on open-task data is not.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from benchmarks.efficacy.attack import Attack, add_lora
from benchmarks.efficacy.pipeline import EfficacyConfig
from benchmarks.efficacy.relearn import RelearnConfig, _advantage, attack_data, run_relearn
from harness.efficacy_suite import SUITE_PRESETS, EfficacySuite
from vllm_guard.errors import GuardError
from vllm_guard.secneuron.train import TrainLocksConfig
from vllm_guard.secneuron.trap import TrapConfig, simulate_lora_tuning, simulate_tuning

CI = RelearnConfig(
    suite="ci", tasks=("rev",), variants=("sealed", "sealed-trap"), methods=(("full", 3e-4),),
    examples=(100,), seeds=(0,), steps=200, checkpoints=(50, 200), probe_every=50,
    benign=("sealed", "sealed-trap"), resume=False,
    efficacy=EfficacyConfig(suite="ci", block=12, sealed_block=64,
                            train=TrainLocksConfig(steps=800), train_examples=1500))


@pytest.fixture(scope="module")
def result() -> dict:
    return run_relearn(CI)


def _row(result: dict, kind: str, variant: str) -> dict:
    return next(r for r in result["table"] if r["kind"] == kind and r["variant"] == variant)


def test_attack_brings_back_the_locked_task_without_the_trap(result):
    never, sealed = _row(result, "attack", "never"), _row(result, "attack", "sealed")
    assert sealed["locked_after"]["0"] <= 0.1  # locked before the attack
    assert sealed["locked_after"]["200"] >= 0.5, sealed  # the attack this issue is about
    assert sealed["advantage"][0]["bound"] in ("=", ">", "<")
    assert never["locked_after"]["0"] <= 0.1


def test_trap_leaves_the_attacker_worse_off_and_benign_tuning_intact(result):
    plain, trapped = _row(result, "attack", "sealed"), _row(result, "attack", "sealed-trap")
    worse_at_task = trapped["locked_after"]["200"] <= plain["locked_after"]["200"] - 0.2
    worse_at_open = trapped["open_min_after"]["200"] <= plain["open_min_after"]["200"] - 0.2
    assert worse_at_task or worse_at_open, (plain, trapped)
    assert min(trapped["open_before"].values()) >= 0.8  # the trap costs nothing unattacked
    plain_b, trapped_b = _row(result, "benign", "sealed"), _row(result, "benign", "sealed-trap")
    assert trapped_b["open_min_after"]["200"] >= plain_b["open_min_after"]["200"] - 0.1, \
        (plain_b, trapped_b)


def test_pii_attack_data_never_includes_the_scored_records():
    suite = EfficacySuite.build(SUITE_PRESETS["ci"])
    shown, scored = attack_data(suite, "pii", 10, seed=0)
    assert len(shown) == 10 and not {e["prompt"] for e in shown} & {e["prompt"] for e in scored}
    assert len(shown) + len(scored) == len(suite.pii_members)
    big, _ = attack_data(suite, "pii", 1000, seed=0)
    assert len(big) == len(suite.pii_members) // 2  # at most half of the records
    rev, test = attack_data(suite, "rev", 50, seed=1)
    assert not {e["prompt"] for e in rev} & {e["prompt"] for e in test}


def test_advantage_bounds():
    assert _advantage(400, 100, 1000) == {"value": 4.0, "bound": "="}
    assert _advantage(None, 100, 1000) == {"value": 10.0, "bound": ">"}
    assert _advantage(400, None, 1000) == {"value": 0.4, "bound": "<"}
    assert _advantage(None, None, 1000)["value"] is None
    assert _advantage(400, 0, 1000)["bound"].startswith("not locked")


def test_lora_trains_only_its_adapters():
    layer = torch.nn.Sequential()
    layer.add_module("q_proj", torch.nn.Linear(4, 4))
    layer.add_module("other", torch.nn.Linear(4, 4))
    params = add_lora(layer, 2, torch.Generator().manual_seed(0))
    assert len(params) == 2 and not any(p.requires_grad for p in layer.parameters())
    x = torch.randn(3, 4)
    before = layer.q_proj(x)
    with torch.no_grad():
        params[1].fill_(1.0)  # B != 0: the adapter now changes the output
    assert not torch.allclose(layer.q_proj(x), before)
    assert Attack("lora", 1e-3, 10, 0).label == "lora lr 0.001, n 10"


def test_simulated_tuning_moves_weights_by_sign_steps_and_keeps_the_graph():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    moved = simulate_tuning({"w": w}, lambda p: (p["w"] ** 2).sum(), steps=2, lr=0.1)
    assert torch.allclose(moved["w"], torch.tensor([0.8, -1.8]))
    moved["w"].sum().backward()  # first order: d(moved)/dw is the identity
    assert torch.equal(w.grad, torch.ones(2))


def test_simulated_lora_tuning_makes_a_low_rank_shift_of_the_projections_only():
    torch.manual_seed(0)
    params = {"layer.q_proj.weight": torch.nn.Parameter(torch.randn(6, 5)),
              "layer.norm.weight": torch.nn.Parameter(torch.randn(5)),
              "layer.other.weight": torch.nn.Parameter(torch.randn(6, 5))}
    x = torch.randn(4, 5)

    def loss(p):
        return ((x @ p["layer.q_proj.weight"].T) ** 2).sum() + (p["layer.norm.weight"] ** 2).sum() \
            + (x @ p["layer.other.weight"].T).sum()
    moved = simulate_lora_tuning(params, loss, steps=3, lr=0.1, rank=2,
                                 generator=torch.Generator().manual_seed(0))
    shift = (moved["layer.q_proj.weight"] - params["layer.q_proj.weight"]).detach()
    assert shift.abs().max() > 0 and torch.linalg.matrix_rank(shift) <= 2
    assert loss(moved) < loss(params)  # the adapters lower the attacker's loss
    assert moved["layer.norm.weight"] is params["layer.norm.weight"]
    assert moved["layer.other.weight"] is params["layer.other.weight"]
    moved["layer.q_proj.weight"].sum().backward()  # first order: the adapters are constants
    assert torch.equal(params["layer.q_proj.weight"].grad, torch.ones(6, 5))


def test_trap_config_rejects_bad_values():
    with pytest.raises(GuardError):
        TrapConfig(inner_steps=0)
    with pytest.raises(GuardError):
        TrapConfig(inner_lr=0)
    with pytest.raises(GuardError):
        TrapConfig(lora_share=1.5)
    with pytest.raises(GuardError):
        TrapConfig(lora_rank=0)
    assert replace(TrapConfig(), every=3).every == 3


def test_unknown_lock_aware_variants_are_refused(tmp_path):
    from benchmarks.efficacy.pipeline import lock_aware_model

    suite = EfficacySuite.build(SUITE_PRESETS["ci"])
    for bad in ("sealed+nope", "blocks+rev", "paper-trap", "shield"):
        with pytest.raises(GuardError, match="unknown lock-aware variant"):
            lock_aware_model(bad, CI.efficacy, suite, tmp_path, lambda: None, tmp_path,
                             lambda _: None)


def test_train_locks_trap_options_need_trap(tmp_path):
    import subprocess
    import sys

    data = tmp_path / "a.jsonl"
    data.write_text('{"prompt": "x", "answer": "y"}\n')
    done = subprocess.run([sys.executable, "-m", "vllm_guard.cli", "train-locks", "--model",
                           str(tmp_path), "--task", f"a={data}", "--block", "4",
                           "--trap-weight", "2", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--trap-* options need --trap" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_benign_tuning_is_also_judged_against_the_same_tuning_without_the_trap():
    from benchmarks.efficacy.relearn import summarise

    def run(variant: str, seed: int, up_after: float) -> dict:
        at = {"0": {"rev": 0.0, "up": 1.0}, "200": {"rev": 0.0, "up": up_after}}
        return {"variant": variant, "target": "rev", "kind": "benign", "steps_to_half": None,
                "attack": {"method": "full", "lr": 1e-3, "examples": 10, "seed": seed}, "at": at}
    cfg = replace(CI, steps=200)
    rows = summarise([run("sealed", 0, 0.5), run("sealed-trap", 0, 0.5)], cfg)
    trapped = next(r for r in rows if r["variant"] == "sealed-trap")
    assert not trapped["benign_kept"] and trapped["kept_vs_no_trap"]  # the tuning's own loss
    rows = summarise([run("sealed", 0, 0.9), run("sealed-trap", 0, 0.5)], cfg)
    assert not next(r for r in rows if r["variant"] == "sealed-trap")["kept_vs_no_trap"]
    assert "kept_vs_no_trap" not in next(r for r in rows if r["variant"] == "sealed")


def _attack_run(variant: str, seed: int, steps_to_half: int | None) -> dict:
    at = {"0": {"up": 0.0, "rev": 1.0}, "200": {"up": 0.6, "rev": 1.0}}
    return {"variant": variant, "target": "up", "kind": "attack", "steps_to_half": steps_to_half,
            "attack": {"method": "lora", "lr": 3e-3, "examples": 1000, "seed": seed}, "at": at}


def test_capability_is_also_judged_against_the_never_trained_model_of_its_shape():
    from benchmarks.efficacy.relearn import render_relearn, summarise

    cfg = replace(CI, steps=200, checkpoints=(200,))
    runs = [_attack_run("never", 0, None), _attack_run("never-wide", 0, 100),
            _attack_run("capability", 0, 100),  # the narrow baseline never gets there
            _attack_run("never", 1, 150), _attack_run("never-wide", 1, 50),
            _attack_run("capability", 1, 100)]
    rows = summarise(runs, cfg)
    cap = next(r for r in rows if r["variant"] == "capability")
    assert cap["advantage"] == [{"value": 2.0, "bound": ">"}, {"value": 1.5, "bound": "="}]
    assert cap["advantage_same_shape"] == [{"value": 1.0, "bound": "="},
                                           {"value": 0.5, "bound": "="}]
    wide = next(r for r in rows if r["variant"] == "never-wide")
    assert "advantage" not in wide and "trap_bar" not in wide  # a baseline, not a lock
    md = render_relearn({"config": {"checkpoints": [200]}, "table": rows,
                         "never_wide": {"up": {"identical": True, "tensors": 3,
                                               "differing_tensors": [],
                                               "differing_config": []}}})
    assert "advantage vs never-wide (same shape)" in md and "| >2.00, 1.50 | 1.00, 0.50 |" in md
    assert "never-wide (up) vs the sealed checkpoint without its key: weights bit-identical" in md
    # a seed without a never-wide run is said so, not read as "never reached 50%"
    rows = summarise([r for r in runs if r != _attack_run("never-wide", 1, 50)], cfg)
    cap = next(r for r in rows if r["variant"] == "capability")
    assert cap["advantage_same_shape"][1] == {"value": None, "bound": "no never-wide run"}
    # without never-wide runs (no capability attacked), tables stay as they were
    rows = summarise([_attack_run("never", 0, None), _attack_run("sealed", 0, 100)], cfg)
    assert "advantage_same_shape" not in rows[1]
    assert "never-wide" not in render_relearn({"config": {"checkpoints": [200]}, "table": rows})


def test_never_wide_is_the_sealed_checkpoint_without_its_key_bit_for_bit(random_tiny, tmp_path):
    """Built from the public model alone, the same-shape baseline holds exactly what a holder
    without the key gets (tiny GQA Llama: 4 heads on 2 KV heads)."""
    from benchmarks.efficacy.relearn import compare_checkpoints, widen_zeroed
    from vllm_guard.secneuron.capability import SealConfig, seal_random, strip_capabilities

    seal = SealConfig(heads=2, neurons=8)
    sealed = seal_random(random_tiny, "t", seal, tmp_path / "sealed",
                         torch.Generator().manual_seed(3), out_std=0.5)
    stripped = strip_capabilities(sealed, ["t"], tmp_path / "stripped")
    wide = widen_zeroed(random_tiny, seal, tmp_path / "wide")
    same = compare_checkpoints(wide, stripped)
    assert same["identical"] and not same["differing_tensors"], same
    assert same["tensors"] > 0 and same["differing_config"] == [], same
    keyed = compare_checkpoints(wide, sealed)  # with the key the sealed slots are not zero
    assert not keyed["identical"]
    assert {n.rsplit(".", 2)[-2] for n in keyed["differing_tensors"]} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    narrow = compare_checkpoints(wide, random_tiny)  # and it is wider than the public model
    assert not narrow["identical"] and "num_attention_heads" in narrow["differing_config"]
