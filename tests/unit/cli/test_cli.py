"""The vllm-guard console script fails clearly on bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vllm_guard.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_serve_missing_model_path_is_one_line_error(tmp_path):
    missing = tmp_path / "no-such-model"
    out = run("serve", str(missing), "--port", "8123")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_serve_missing_model_flag_form(tmp_path):
    out = run("serve", "--model", str(tmp_path / "nope"))
    assert out.returncode != 0 and "nope" in out.stderr and "Traceback" not in out.stderr


def test_unknown_subcommand():
    out = run("frobnicate")
    assert out.returncode == 2
    assert "invalid choice: 'frobnicate'" in out.stderr and "Traceback" not in out.stderr


def test_serve_forwards_arguments_unchanged(tmp_path):
    from vllm_guard.cli.serve import guard_env, server_argv

    argv = server_argv([str(tmp_path), "--max-model-len", "64", "--port=9", "--enforce-eager"])
    assert argv[1:] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp_path),
                        "--max-model-len", "64", "--port=9", "--enforce-eager",
                        "--host", "127.0.0.1"]
    env = guard_env({"VLLM_PLUGINS": "other"})
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0" and env["VLLM_PLUGINS"] == "other,vllm_guard"


def in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """The CLI's ``main`` in this process (torch is imported once, not per call)."""
    from vllm_guard.cli import main

    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def test_train_locks_cli_writes_a_lockable_model(tmp_path, random_tiny, capsys):
    import json

    from harness.fixtures import task_examples
    from vllm_guard.secneuron.selection import Selection

    files = []
    for task in ("add", "reverse"):
        path = tmp_path / f"{task}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in task_examples(task, 16)))
        files += ["--task", f"{task}={path}"]

    def train_locks(*args: str) -> subprocess.CompletedProcess:
        return in_process(capsys, "train-locks", "--model", str(random_tiny), *files, *args)

    out = train_locks("--block", "8", "--steps", "3", "--batch-size", "4",
                      "--out", str(tmp_path / "aware"))
    assert out.returncode == 0, out.stderr
    sel = Selection.load(tmp_path / "aware" / "lock_selection.json")
    assert sel.tasks == ["add", "reverse"] and sel.neurons[0]["reverse"] == list(range(504, 512))
    assert (tmp_path / "aware" / "model.safetensors").exists()

    sealed = train_locks("--block", "8", "--seal", "reverse", "--sealed-block", "16", "--steps",
                         "2", "--seal-steps", "2", "--batch-size", "4",
                         "--out", str(tmp_path / "sealed"))
    assert sealed.returncode == 0, sealed.stderr
    assert "seal reverse step 2/2" in sealed.stdout
    sel = Selection.load(tmp_path / "sealed" / "lock_selection.json")
    assert sel.neurons[0]["reverse"] == list(range(496, 512))
    unknown = train_locks("--block", "8", "--seal", "sort", "--out", str(tmp_path / "z"))
    assert unknown.returncode != 0 and "sealed task(s) ['sort']" in unknown.stderr

    both = train_locks("--block", "8", "--selection", "x.json", "--out", str(tmp_path / "x"))
    assert both.returncode != 0 and "exactly one of --selection" in both.stderr
    too_big = train_locks("--block", "300", "--out", str(tmp_path / "y"))
    assert too_big.returncode != 0 and "do not fit" in too_big.stderr
    assert "Traceback" not in both.stderr + too_big.stderr + unknown.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_serve_refuses_config_typos_and_missing_secrets_in_one_line(tmp_path, random_tiny):
    """Each typo or wrong type from the review, at startup, before vLLM starts."""
    import json
    import os

    cases = {
        "grants": [({"mode": "required", "tasks": ["add"], "revoke": ["bob"]}, "'revoke'"),
                   ({"mode": 1}, "'mode'")],
        "masking": [({"vault": "memory", "ttl_seconds": "60"}, "'ttl_seconds'"),
                    ({"vualt": "redis"}, "'vualt'"),
                    ({"terms_file": "missing.txt"}, "terms_file"),
                    ({"vault": "redis"}, "VLLM_GUARD_")],
    }
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_GUARD_VAULT_KEY", "VLLM_GUARD_SESSION_KEY")}
    for flag, docs in cases.items():
        for doc, named in docs:
            path = tmp_path / f"{flag}.json"
            path.write_text(json.dumps(doc))
            out = subprocess.run([sys.executable, "-m", "vllm_guard.cli", "serve",
                                  str(random_tiny), f"--{flag}", str(path)],
                                 capture_output=True, text=True, timeout=120, env=env)
            lines = out.stderr.strip().splitlines()
            assert out.returncode == 1 and len(lines) == 1 and named in lines[0], out.stderr
    extra = json.dumps({"allow_unsigned": "false"})
    from vllm_guard.errors import GuardError
    from vllm_guard.secneuron.options import SecNeuronLoadConfig

    try:
        SecNeuronLoadConfig.from_extra(json.loads(extra))
    except GuardError as e:
        assert "'allow_unsigned'" in str(e) and "\n" not in str(e)
    else:
        raise AssertionError("'allow_unsigned': 'false' was accepted")


def test_untested_vllm_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from vllm_guard.compat import check_vllm_version, installed_vllm_version
    from vllm_guard.errors import GuardError

    check_vllm_version(installed_vllm_version())  # the installed one is tested
    for version in ("0.11.0", "0.33.0", "1.0.0", "nightly"):
        with pytest.raises(GuardError, match="not a version vllm-guard is tested with") as e:
            check_vllm_version(version)
        assert "\n" not in str(e.value)
    monkeypatch.setattr("vllm_guard.compat.installed_vllm_version", lambda: "0.11.0")
    grants = tmp_path / "g.json"
    grants.write_text('{"api_keys": []}')
    from vllm_guard.cli import main

    assert main(["serve", str(tmp_path), "--grants", str(grants)]) == 1
    err = capsys.readouterr().err.strip()
    assert "vLLM 0.11.0 is not a version" in err and "\n" not in err, err


def test_keygen_never_overwrites_a_key_without_force(tmp_path, capsys):
    """Running a README command twice must not destroy the only key to a checkpoint."""
    for args, files in ((["--task", "add", "--out", str(tmp_path / "add.key")], ["add.key"]),
                        (["--signing", "--out", str(tmp_path / "pub.pem")],
                         ["pub.pem", "pub.pub"])):
        assert in_process(capsys, "keygen", *args).returncode == 0
        before = {f: (tmp_path / f).read_bytes() for f in files}
        again = in_process(capsys, "keygen", *args)
        assert again.returncode == 1 and "refusing to overwrite" in again.stderr
        assert len(again.stderr.strip().splitlines()) == 1
        assert {f: (tmp_path / f).read_bytes() for f in files} == before
        assert in_process(capsys, "keygen", *args, "--force").returncode == 0
        assert {f: (tmp_path / f).read_bytes() for f in files} != before


def test_a_locked_checkpoint_without_its_loader_is_refused_in_one_line(tmp_path):
    from vllm_guard.cli.serve import server_argv
    from vllm_guard.errors import GuardError
    from vllm_guard.secneuron.manifest import MANIFEST_NAME

    (tmp_path / MANIFEST_NAME).write_text("{}")
    for args in ([str(tmp_path)], ["--model", str(tmp_path), "--load-format", "auto"]):
        with pytest.raises(GuardError, match="locked checkpoint .* --load-format secneuron"):
            server_argv(args)
    for form in (["--load-format", "secneuron"], ["--load-format=secneuron"]):
        assert "--model" in server_argv([str(tmp_path), *form])
    (tmp_path / MANIFEST_NAME).unlink()
    assert "--model" in server_argv([str(tmp_path)])  # a plain checkpoint: vLLM's loaders


def test_version(capsys):
    from vllm_guard import __version__

    out = in_process(capsys, "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"vllm-guard {__version__}"
