"""Sealed tasks: what only a sealed task's neurons learn cannot reach the model without its key.

Two lock-aware runs differ only in the sealed task's records. With that task locked they must
be the same model bit for bit (the public weights never depended on the records); with it
granted they must differ (the records were learnt, in the sealed neurons).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers

from harness.efficacy_suite import SUITE_PRESETS, EfficacySuite
from vllm_guard.demo.tasks import build_model, build_tokenizer
from vllm_guard.errors import GuardError
from vllm_guard.secneuron.neuron_bits import selection_bits
from vllm_guard.secneuron.selection import Selection
from vllm_guard.secneuron.train import (
    TrainLocksConfig,
    neuron_mask,
    reserved_blocks,
    train_locks,
)

CONFIG = TrainLocksConfig(steps=6, batch_size=8, sealed=("pii",), seal_steps=6)


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> Path:
    cfg = replace(SUITE_PRESETS["ci"], hidden_size=32, intermediate_size=64,
                  num_attention_heads=1)
    torch.manual_seed(0)
    tok = build_tokenizer()
    out = tmp_path_factory.mktemp("sealed") / "start"
    build_model(cfg, tok).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _train(start: Path, out: Path, heldout_records: bool) -> tuple[Path, Selection]:
    suite = EfficacySuite.build(SUITE_PRESETS["ci"])
    records = suite.pii_heldout[:32] if heldout_records else suite.pii_members
    data = {"inc": suite.train_set("inc", 64, seed=1), "pii": records}
    sel = reserved_blocks(["inc", "pii"], 2, 64, 8, {"pii": 16})
    train_locks(start, data, sel, CONFIG, out, progress=lambda _: None)
    return out, sel


def _logits(model_dir: Path, sel: Selection, grant: int) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.arange(4, 40).reshape(2, 18)
    with torch.no_grad(), neuron_mask(model, selection_bits(sel, 64),
                                      torch.full((2,), grant, dtype=torch.int64)):
        return model(input_ids=ids).logits


def test_public_weights_do_not_depend_on_sealed_records(start, tmp_path):
    a, sel = _train(start, tmp_path / "a", heldout_records=False)
    b, _ = _train(start, tmp_path / "b", heldout_records=True)
    inc_only, both = 0b01, 0b11
    assert torch.equal(_logits(a, sel, inc_only), _logits(b, sel, inc_only))
    assert not torch.allclose(_logits(a, sel, both), _logits(b, sel, both))
    # and the open task was trained (phase 1 changed the start model)
    assert not torch.allclose(_logits(a, sel, inc_only), _logits(start, sel, inc_only))

    wa = transformers.AutoModelForCausalLM.from_pretrained(a).state_dict()
    wb = transformers.AutoModelForCausalLM.from_pretrained(b).state_dict()
    sealed = torch.zeros(64, dtype=torch.bool)
    sealed[sel.neurons[0]["pii"]] = True
    for name, w in wa.items():
        if "down_proj" in name:
            assert torch.equal(w[:, ~sealed], wb[name][:, ~sealed]), name
        elif "gate_proj" in name or "up_proj" in name:
            assert torch.equal(w[~sealed], wb[name][~sealed]), name
        else:
            assert torch.equal(w, wb[name]), name


def test_sealing_refuses_shared_neurons_and_missing_data(start, tmp_path):
    suite = EfficacySuite.build(SUITE_PRESETS["ci"])
    data = {"inc": suite.train_set("inc", 16, seed=1), "pii": suite.pii_members}
    shared = Selection(["inc", "pii"], {0: {"inc": [0, 1], "pii": [0, 1]},
                                        1: {"inc": [2], "pii": [2]}})
    with pytest.raises(GuardError, match="own no neuron of their own"):
        train_locks(start, data, shared, CONFIG, tmp_path / "x", progress=lambda _: None)
    sel = reserved_blocks(["inc", "pii"], 2, 64, 8)
    with pytest.raises(GuardError, match=r"sealed task\(s\) \['pii'\] have no training"):
        train_locks(start, {"inc": data["inc"]}, sel, CONFIG, tmp_path / "y",
                    progress=lambda _: None)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_trap_terms_stop_for_the_settle_share(start, tmp_path, monkeypatch):
    from vllm_guard.secneuron import trap as trap_mod

    calls: list[int] = []

    def counted(self):
        calls.append(len(calls))
        return torch.zeros(())
    monkeypatch.setattr(trap_mod.CollapseTrap, "loss", counted)
    suite = EfficacySuite.build(SUITE_PRESETS["ci"])
    data = {"inc": suite.train_set("inc", 32, seed=1), "up": suite.train_set("up", 32, seed=1)}
    sel = reserved_blocks(["inc", "up"], 2, 64, 8)
    trap = trap_mod.TrapConfig(every=1, settle=0.25)
    train_locks(start, data, sel, replace(TrainLocksConfig(steps=8, batch_size=4), trap=trap),
                tmp_path / "m", progress=lambda _: None)
    assert len(calls) == 6  # steps 1-6 of 8: the last quarter settles without the trap
    with pytest.raises(GuardError, match="settle"):
        trap_mod.TrapConfig(settle=1.0)
