"""Protection efficacy on a small model (the full table is ``python -m benchmarks.efficacy``).

The CI suite trains a small multitask model, then runs the real pipeline: paper-faithful
extract + lock, lock-aware training with reserved blocks and the PII task sealed (learnt
only in its block, from a model trained without the records), lock, unlock per grant set,
and a real vLLM server with one API key per grant set. It asserts the direction and size of
the effect: locked tasks collapse, authorized tasks are kept, PII is no longer extractable
and membership inference is at chance.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from benchmarks.efficacy.dp import DpConfig
from benchmarks.efficacy.pipeline import (
    EfficacyConfig,
    grant_sets,
    judge,
    render_markdown,
    run_efficacy,
)
from benchmarks.efficacy.scoring import auroc, auroc_interval
from harness.efficacy_suite import SUITE_PRESETS, EfficacySuite
from vllm_guard.errors import GuardError
from vllm_guard.secneuron.neuron_bits import selection_bits
from vllm_guard.secneuron.selection import Selection
from vllm_guard.secneuron.train import TrainLocksConfig, reserved_blocks

CI = EfficacyConfig(suite="ci", sweep=(), assignments=("sealed",), grant_sizes=(1,),
                    block=12, sealed_block=64, train=TrainLocksConfig(steps=800),
                    train_examples=1500, e2e_per_task=20, dp_epsilons=(1.0,),
                    dp=DpConfig(epochs=10))


@pytest.fixture(scope="module")
def result() -> dict:
    return run_efficacy(CI)


def test_base_model_learned_every_task(result):
    before = result["before"]
    assert min(before["accuracy"].values()) >= 0.8, before
    assert before["mia_auroc"] >= 0.9  # memorised records are recognisable before locking


def test_lock_aware_locks_remove_unauthorized_tasks_and_keep_authorized(result):
    before = result["before"]["accuracy"]
    (aware,) = result["lock_aware"]
    for row in aware["rows"]:
        granted = set(row["grant"])
        for task, acc in row["accuracy"].items():
            if task == "pii" and task in granted:
                # sealed: only the PII block learns the records, through attention trained
                # without them; this 2-layer, 64-wide model reaches 0.92-0.96 (full suite 1.00)
                assert acc >= 0.85, row
            elif task in granted:
                assert before[task] - acc <= 0.05, row
            else:
                assert acc <= 0.10, row
        if "pii" not in granted:
            assert row["pii_extraction"] <= 0.05, row
            # sealed: the locked model never saw a record, so both attacks are at chance up
            # to sampling noise (24 vs 96 records: ~0.05, so allow 0.15; unlocked: ~1.0)
            assert abs(row["mia_auroc"] - 0.5) <= 0.15, row
            assert abs(row["mia_auroc_beneath_eos"] - 0.5) <= 0.15, row


def test_paper_faithful_table_is_reported(result):
    paper = result["paper"]
    assert paper["of"] == len(result["grant_sets"]) == len(paper["rows"])
    for row in paper["rows"]:
        assert set(row["accuracy"]) == set(result["before"]["accuracy"])


def test_served_scores_match_offline_scores(result):
    e2e = result["e2e"]
    assert len(e2e["rows"]) == len(result["grant_sets"])
    assert e2e["max_abs_diff"] <= 0.1, e2e
    # the server really enforces the grant: a task outside it collapses there too
    for row in e2e["rows"]:
        for task, acc in row["served"].items():
            if task not in row["grant"]:
                assert acc <= 0.15, row


def test_dp_baseline_is_private_and_reported_beside_sealing(result):
    (row,) = result["dp"]["rows"]
    assert row["epsilon"] <= 1.0 + 1e-6 and row["noise_multiplier"] > 0.5  # Opacus accounted
    assert row["pii_extraction"] <= 0.05  # at epsilon 1 the records are not learnt
    assert "DP-SGD epsilon 1 (accounted" in render_markdown(result)
    sealed = result["lock_aware"][0]
    assert sealed["all_keys"]["pii_extraction"] >= 0.9  # what DP cannot give a key holder
    assert sealed["without_pii_key"]["pii_extraction"] <= 0.01


def test_judge_applies_the_bar():
    before = {"a": 1.0, "b": 0.9, "pii": 1.0}
    ok = {"grant": ["a"], "accuracy": {"a": 0.99, "b": 0.05, "pii": 0.0},
          "pii_extraction": 0.0, "mia_auroc": 0.5}
    assert judge(ok, before)["pass"]
    assert not judge({**ok, "accuracy": {**ok["accuracy"], "a": 0.95}}, before)["pass"]
    assert not judge({**ok, "accuracy": {**ok["accuracy"], "b": 0.2}}, before)["pass"]
    assert not judge({**ok, "mia_auroc": 0.7}, before)["pass"]


def test_selection_bits_match_the_policy_tree():
    sel = Selection(["a", "b"], {0: {"a": [0, 1], "b": [1, 2]}})
    bits = selection_bits(sel, 4)[0].tolist()
    assert bits == [0b01, 0b11, 0b10, -1]


def test_reserved_blocks_and_bad_sizes():
    sel = reserved_blocks(["a", "b"], 2, 64, 8)
    assert sel.neurons[1]["b"] == list(range(56, 64))
    sized = reserved_blocks(["a", "b", "c"], 1, 64, 8, {"b": 20})
    assert sized.neurons[0] == {"a": list(range(28, 36)), "b": list(range(36, 56)),
                                "c": list(range(56, 64))}
    with pytest.raises(GuardError, match="do not fit"):
        reserved_blocks(["a", "b"], 2, 16, 8)
    with pytest.raises(GuardError, match="do not fit"):
        reserved_blocks(["a", "b"], 2, 64, 8, {"a": 0})


def test_suite_splits_are_disjoint_and_deterministic():
    cfg = replace(SUITE_PRESETS["ci"], test_size=50)
    a, b = EfficacySuite.build(cfg), EfficacySuite.build(cfg)
    assert a.test == b.test
    assert {e["prompt"] for e in a.pii_members}.isdisjoint(e["prompt"] for e in a.pii_heldout)
    for task in ("inc", "rev", "up"):
        held = {e["prompt"] for e in a.test[task]}
        assert not held & {e["prompt"] for e in a.train_set(task, 2000, seed=0)}
    assert grant_sets(("a", "b", "c"), (1, 2)) == [("a",), ("b",), ("c",), ("a", "b"),
                                                   ("a", "c"), ("b", "c")]


def test_auroc():
    assert auroc([0.1, 0.2], [0.5, 0.6]) == 1.0
    assert auroc([0.5, 0.6], [0.1, 0.2]) == 0.0
    assert auroc([1.0], [1.0]) == 0.5
    assert torch.isclose(torch.tensor(auroc([0.1, 0.9], [0.5])), torch.tensor(0.5))


def test_auroc_interval_covers_the_estimate_and_narrows_with_more_records():
    gen = torch.Generator().manual_seed(1)

    def width(n: int, shift: float) -> tuple[float, float, float]:
        m = (torch.rand(n, generator=gen) - shift).tolist()
        h = torch.rand(n, generator=gen).tolist()
        lo, hi = auroc_interval(m, h)
        assert lo <= auroc(m, h) <= hi
        return lo, hi, hi - lo

    lo, hi, small = width(64, 0.0)
    assert lo < 0.5 < hi  # nothing to find: the interval straddles chance
    assert width(64, 0.5)[0] > 0.7  # a real gap (true AUROC 0.875) is found
    assert width(1024, 0.0)[2] < small / 2


def test_score_answers_loss_is_the_models_own_and_beneath_eos_drops_the_stop_part(result):
    """``loss`` equals HF's own loss on the answer; ``loss_beneath_eos`` removes
    -log(1 - p(EOS)) >= 0 from it, strictly wherever EOS has any probability."""
    from benchmarks.efficacy.pipeline import _load
    from benchmarks.efficacy.scoring import score_answers
    from harness.efficacy_suite import multitask_model
    from vllm_guard.secneuron.examples import AnswerBatcher

    suite = EfficacySuite.build(SUITE_PRESETS["ci"])
    model, tok = _load(multitask_model(SUITE_PRESETS["ci"]))
    rows = suite.pii_members[:4] + suite.test["rev"][:4]
    scores = score_answers(model, tok, rows)
    batcher = AnswerBatcher(tok)
    for row, loss in zip(rows, scores.loss, strict=True):
        ids, labels = batcher.encode([row], eos=False)
        with torch.no_grad():
            hf = model(input_ids=ids, labels=labels).loss.item()
        assert abs(hf - loss) < 1e-4 * max(1.0, hf)
    gaps = [a - b for a, b in zip(scores.loss, scores.loss_beneath_eos, strict=True)]
    assert all(g > 0 for g in gaps), gaps
    for row in result["lock_aware"][0]["rows"]:
        assert 0.0 <= row["mia_auroc_beneath_eos"] <= 1.0


def test_seal_steps_reaches_both_the_efficacy_and_the_relearn_config(monkeypatch):
    import benchmarks.efficacy.__main__ as cli

    seen: list = []
    monkeypatch.setattr(cli, "run_efficacy", lambda c: seen.append(c.seal) or {})
    monkeypatch.setattr(cli, "run_relearn", lambda c: seen.append(c.efficacy.seal) or {})
    for name in ("_report", "render_markdown", "render_relearn"):
        monkeypatch.setattr(cli, name, lambda *a: 0)
    cli.main(["--suite", "ci", "--capabilities", "up", "--seal-steps", "3000"])
    cli.main(["--relearn", "--variants", "capability", "--seal-steps", "2500"])
    cli.main(["--suite", "ci", "--capabilities", "up"])
    assert [s.steps for s in seen] == [3000, 2500, EfficacyConfig().seal.steps]
    assert seen[0] == replace(EfficacyConfig().seal, steps=3000)  # nothing else changed
    with pytest.raises(SystemExit):
        cli.main(["--suite", "ci", "--seal-steps", "0"])


def test_relearn_steps_sets_the_attack_length_and_scores_at_its_end(monkeypatch):
    import benchmarks.efficacy.__main__ as cli

    seen: list = []
    monkeypatch.setattr(cli, "run_relearn", lambda c: seen.append(c) or {})
    for name in ("_report", "render_relearn"):
        monkeypatch.setattr(cli, name, lambda *a: 0)
    cli.main(["--relearn", "--variants", "capability", "--steps", "2000"])
    cli.main(["--relearn", "--variants", "capability", "--steps", "150"])
    cli.main(["--relearn", "--variants", "capability"])
    assert [(c.steps, c.checkpoints) for c in seen] == [
        (2000, (50, 200, 1000, 2000)), (150, (50, 150)), (1000, (50, 200, 1000))]
    with pytest.raises(SystemExit):
        cli.main(["--relearn", "--steps", "0"])
