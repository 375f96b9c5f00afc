"""``vllm-guard scrub``: JSONL training data de-identified line by line, restored exactly from
the sealed mapping, and no raw value in the output, the report, stderr or the mapping file."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from harness.pii_corpus import generate
from vllm_guard.masking.config import MaskingConfig
from vllm_guard.masking.detection.detector import build_detector
from vllm_guard.masking.scrub import Scrubber, ScrubError, scrub_file

ROOT = Path(__file__).resolve().parents[3]
STRICT = {"EMAIL_ADDRESS", "CREDIT_CARD", "US_SSN", "CN_RESIDENT_ID", "IBAN_CODE"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    examples = generate(90, seed=11)
    path = tmp_path_factory.mktemp("scrub") / "train.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(0, len(examples), 2):
            a, b = examples[i], examples[i + 1]
            doc = {"id": i, "prompt": a.text, "answer": b.text, "meta": {"source": "crm"},
                   "messages": [{"role": "user", "content": b.text}]}
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    values = {(e, ex.text[s:t]) for ex in examples for s, t, e in ex.spans}
    return path, values


def cli(*args: str, key: str | None = None, masking: str = "masking.fast.json",
        env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``vllm-guard scrub`` through the CLI's ``main``, in this process (the detector libraries
    load once per test session, not once per call), with the environment it would see."""
    from vllm_guard.cli import main

    env = {name: None for name in ("VLLM_GUARD_SCRUB_KEY", "VLLM_GUARD_FPE_KEY")}
    env.update(env_extra or {})
    if key:
        env["VLLM_GUARD_SCRUB_KEY"] = key
    saved = {name: os.environ.get(name) for name in env}
    out, err = io.StringIO(), io.StringIO()
    try:
        for name, value in env.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(["scrub", *args, "--masking", masking, "--no-progress"])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def test_scrub_then_restore_is_exact_and_leaks_nothing(dataset, tmp_path):
    src, values = dataset
    key = base64.b64encode(os.urandom(32)).decode()
    out, mapping, report = tmp_path / "clean.jsonl", tmp_path / "map.json", tmp_path / "r.json"
    done = cli(str(src), str(out), "--fields", "prompt,answer,messages",
               "--keep-mapping", str(mapping), "--report", str(report), key=key)
    assert done.returncode == 0, done.stderr[-2000:]
    scrubbed = out.read_text(encoding="utf-8")
    sealed = mapping.read_text()
    logs = done.stderr + done.stdout + report.read_text()
    leaked = {v for v in values if v[1] in scrubbed}
    assert not {v for v in leaked if v[0] in STRICT}, "a checksummed value survived"
    assert len(leaked) <= 0.02 * len(values), sorted(e for e, _ in leaked)
    assert not any(v in logs or v in sealed for _, v in values)
    rows = [json.loads(line) for line in scrubbed.splitlines()]
    assert all(r["meta"] == {"source": "crm"} and isinstance(r["id"], int) for r in rows)
    summary = json.loads(report.read_text())
    assert summary["lines"] == len(rows) and summary["masked"]["EMAIL_ADDRESS"] > 0
    # the same value gets the same placeholder everywhere in the file
    assert all(r["messages"][0]["content"] == r["answer"] for r in rows)

    back = tmp_path / "restored.jsonl"
    done = cli(str(out), str(back), "--restore", "--keep-mapping", str(mapping),
               "--fields", "prompt,answer,messages", key=key)
    assert done.returncode == 0, done.stderr[-2000:]
    assert back.read_text(encoding="utf-8") == src.read_text(encoding="utf-8")
    assert f"restored {len(rows)} lines" in done.stderr  # it said 0 before

    wrong = base64.b64encode(os.urandom(32)).decode()
    done = cli(str(out), str(tmp_path / "x.jsonl"), "--restore", "--keep-mapping",
               str(mapping), key=wrong)
    assert done.returncode == 1 and "wrong key or tampered" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = cli(str(src), str(out), key=key)  # exists, no --force
    assert done.returncode == 1 and "--force" in done.stderr


def test_bad_line_names_its_number_and_leaves_no_output(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"prompt": "mail jane.roe@example.com"}\n{"prompt": "jane.roe@example.com'
                   '\n{"prompt": 5}\n', encoding="utf-8")
    det = build_detector(MaskingConfig(ner="off"))
    with pytest.raises(ScrubError, match="line 2: not valid JSON") as e:
        scrub_file(src, tmp_path / "out.jsonl", Scrubber(det))
    assert "jane" not in str(e.value)
    assert list(tmp_path.iterdir()) == [src]  # nothing partial left behind
    src.write_text('{"prompt": 5}\n', encoding="utf-8")
    with pytest.raises(ScrubError, match="line 1: field 'prompt' is not text"):
        scrub_file(src, tmp_path / "out.jsonl", Scrubber(det))


def test_values_found_once_are_masked_on_later_lines(tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [{"text": "Customer: Mary Smith, mary@example.com"},
             {"text": "mary smith? no: Mary Smith called again"}]
    src.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    scrubber = Scrubber(build_detector(MaskingConfig(ner="off")))
    scrub_file(src, tmp_path / "out.jsonl", scrubber)
    out = (tmp_path / "out.jsonl").read_text()
    assert "Mary Smith" not in out and out.count("<PERSON_1>") == 2
    assert scrubber.mapping["<PERSON_1>"] == "Mary Smith"


def test_scrub_with_surrogates_and_fpe_restores_exactly(dataset, tmp_path):
    src, values = dataset
    config = tmp_path / "masking.json"
    config.write_text(json.dumps({"ner": "off", "strategies": {
        "PERSON": "surrogate", "EMAIL_ADDRESS": "surrogate", "IP_ADDRESS": "surrogate",
        "IBAN_CODE": "surrogate", "CREDIT_CARD": "fpe", "US_SSN": "fpe",
        "CN_RESIDENT_ID": "fpe", "PHONE_NUMBER": "fpe"}}))
    key = base64.b64encode(os.urandom(32)).decode()
    fpe_key = {"VLLM_GUARD_FPE_KEY": base64.b64encode(os.urandom(32)).decode()}
    out, mapping = tmp_path / "clean.jsonl", tmp_path / "map.json"
    fields = "prompt,answer,messages"
    missing = cli(str(src), str(out), "--fields", fields, masking=str(config))
    assert missing.returncode == 1 and "VLLM_GUARD_FPE_KEY" in missing.stderr  # one line
    done = cli(str(src), str(out), "--fields", fields, "--keep-mapping", str(mapping),
               key=key, masking=str(config), env_extra=fpe_key)
    assert done.returncode == 0, done.stderr[-2000:]
    scrubbed = out.read_text(encoding="utf-8")
    assert not {v for v in values if v[0] in STRICT and v[1] in scrubbed}
    assert "<EMAIL_ADDRESS_" not in scrubbed and "@example." in scrubbed  # surrogates
    back = tmp_path / "restored.jsonl"
    done = cli(str(out), str(back), "--restore", "--keep-mapping", str(mapping),
               "--fields", fields, key=key, masking=str(config), env_extra=fpe_key)
    assert done.returncode == 0, done.stderr[-2000:]
    assert back.read_text(encoding="utf-8") == src.read_text(encoding="utf-8")


EMAIL, SSN = "jane.roe@example.com", "078-05-1120"
SECRET = f"mail {EMAIL} ssn {SSN}"
SHAPES = [  # record shapes the scrubber once copied through untouched (issue #32 item 3)
    {"conversations": [{"from": "human", "value": SECRET}, {"from": "gpt", "value": "ok"}]},
    {"messages": [{"role": "assistant", "content": None, "reasoning_content": SECRET,
                   "name": EMAIL, "tool_calls": [
                       {"id": "c1", "type": "function", "function": {
                           "name": "send", "arguments": json.dumps({"to": EMAIL})}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": SECRET}]}]},
    {"prompt": [{"text": SECRET}], "completion": SECRET},
    {"text": SECRET, "answer": {"parts": [SECRET, {"deep": [SSN]}]}},
]


def test_every_record_shape_is_scrubbed_with_the_default_fields(tmp_path):
    src, out, back = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "back.jsonl"
    mapping = tmp_path / "map"
    src.write_text("".join(json.dumps(r) + "\n" for r in [{"prompt": SECRET}, *SHAPES]),
                   encoding="utf-8")
    key = base64.b64encode(os.urandom(32)).decode()
    done = cli(str(src), str(out), "--keep-mapping", str(mapping), key=key)
    assert done.returncode == 0, done.stderr[-2000:]
    scrubbed = out.read_text(encoding="utf-8")
    assert EMAIL not in scrubbed and SSN not in scrubbed, scrubbed
    rows = [json.loads(line) for line in scrubbed.splitlines()]
    assert rows[1]["conversations"][0]["from"] == "human"  # structure kept
    done = cli(str(out), str(back), "--restore", "--keep-mapping", str(mapping), key=key)
    assert done.returncode == 0, done.stderr[-2000:]
    assert back.read_text(encoding="utf-8") == src.read_text(encoding="utf-8")


@pytest.mark.parametrize("record,path", [
    ({"prompt": "hi", "completion": SECRET}, "'completion'"),
    ({"prompt": "hi", "conversations": [{"from": "human", "value": SECRET}]},
     "'conversations[0].value'"),
    ({"prompt": "hi", "meta": {"owner": EMAIL}}, "'meta.owner'"),
    ({"prompt": "hi", "meta": {EMAIL: 1}}, "a key of 'meta'"),
    ({"prompt": [{"text": "hi", "card": 4012888888881881}]}, "'prompt[0].card'"),
    ({"prompt": "hi", "id": 4012888888881881.0}, "'id'"),
])
def test_a_value_the_scrubber_cannot_rewrite_stops_the_run(tmp_path, record, path):
    """Fields not named in --fields are copied only when they hold nothing sensitive; a
    sensitive key or JSON number cannot become a stand-in. Either stops the run: one line
    naming the line and the path, no value, exit 1, no output left behind."""
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps(record) + "\n",
                   encoding="utf-8")
    done = cli(str(src), str(tmp_path / "out.jsonl"), "--fields", "prompt")
    assert done.returncode == 1, (done.stderr, done.stdout)
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and err.count("line 2: ") == 1 and path in err, err
    assert EMAIL not in err and SSN not in err and "4012888888881881" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.fixture(scope="module")
def fast_detector():
    return build_detector(MaskingConfig(ner="off", name_lists=False))


def test_ordinary_ids_and_timestamps_pass(fast_detector):
    """Unnamed numbers stop the run only under the masker's number rule (checksummed or
    known): ids and millisecond timestamps the phone patterns read are copied."""
    record = {"prompt": "hi", "id": 3792497226, "ts": 1733540000010, "n": [2147483647, 0.5],
              "meta": {"max": 4294967295, "min": -2147483648}}
    scrubber = Scrubber(fast_detector, fields=("prompt",))
    assert json.loads(scrubber.scrub_line(json.dumps(record), 1)) == record


@pytest.mark.parametrize("record,path,advice", [
    ({"prompt": "hi", "meta": {"card": 4012888888881881.5}}, "'meta.card'",
     "add 'meta' to --fields"),
    ({"prompt": "hi", "x": 0.4012888888881881}, "'x'", "add 'x' to --fields"),
    ({"prompt": ["call 13800138000", 13800138000]}, "'prompt[1]'", "write it as a string"),
])
def test_a_sensitive_number_stops_the_run_with_advice_that_helps(fast_detector, record, path,
                                                                  advice):
    scrubber = Scrubber(fast_detector, fields=("prompt",))
    with pytest.raises(ScrubError) as e:
        scrubber.scrub_line(json.dumps(record), 3)
    msg = str(e.value)
    assert msg.startswith("line 3: ") and path in msg and advice in msg, msg
    assert "4012888888881881" not in msg and "13800138000" not in msg
