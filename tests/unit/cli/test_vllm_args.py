"""Serve and its preflight read vLLM's flags as vLLM does: a locked checkpoint could reach
vLLM's default loader unchecked when serve saw the first ``--load-format`` (secneuron) and
vLLM the last (auto), or a spelling serve did not read (``--load_format``, ``--load-form``)."""

from __future__ import annotations

import pytest

from vllm_guard.errors import GuardError
from vllm_guard.secneuron.manifest import MANIFEST_NAME


@pytest.mark.parametrize("override", [
    ["--load-format", "auto"], ["--load-format=auto"], ["--load_format", "auto"],
    ["--load_format=auto"], ["--load-form", "auto"], ["--load", "auto"],
])
def test_a_second_load_format_cannot_skip_the_checkpoint_checks(tmp_path, override):
    from vllm_guard.cli.serve import server_argv

    (tmp_path / MANIFEST_NAME).write_text("{}")
    with pytest.raises(GuardError) as e:
        server_argv([str(tmp_path), "--load-format", "secneuron", *override])
    assert getattr(e.value, "exit_code", 1) == 2, e.value
    # alone, the other spellings are the flag vLLM reads: a locked checkpoint needs secneuron
    with pytest.raises(GuardError, match="locked checkpoint|spell out"):
        server_argv([str(tmp_path), *override])


@pytest.mark.parametrize("args", [
    ["--model", "A", "--model", "B"], ["A", "--model=B"],
    ["--model", "A", "--model-loader-extra-config", "{}", "--model_loader_extra_config={}"],
])
def test_repeated_model_or_loader_config_is_refused_as_ambiguous(tmp_path, args):
    from vllm_guard.cli.serve import server_argv

    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    with pytest.raises(GuardError, match="more than once") as e:
        server_argv([a if a.startswith("-") or a == "{}" else str(tmp_path / a) for a in args])
    assert e.value.exit_code == 2


def test_one_reader_last_wins_any_spelling():
    from vllm_guard.cli import preflight
    from vllm_guard.cli.vllm_args import flag_value

    args = ["--port", "1", "--port=2", "--load_format", "x", "--model-loader-extra-config.a=1"]
    assert flag_value(args, "--port") == "2" and flag_value(args, "--load-format") == "x"
    assert flag_value(args, "--model-loader-extra-config") is None  # a dotted sub-key
    assert preflight.flag_value is flag_value  # the preflight reads flags through it too


def test_the_model_path_vllm_gets_is_the_one_checked(tmp_path, monkeypatch):
    """``--model=~/ckpt``: the preflight expanded ``~``, the loader opened ``Path("~/ckpt")``."""
    from vllm_guard.cli.serve import server_argv
    from vllm_guard.cli.vllm_args import flag_value

    (tmp_path / "ckpt").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for form in (["--model=~/ckpt"], ["--model", "~/ckpt"], ["./ckpt"], ["--model=./ckpt"]):
        argv = server_argv([*form, "--port", "9"])
        assert flag_value(argv, "--model") == str((tmp_path / "ckpt").resolve()), (form, argv)
        assert sum(a.startswith("--model") for a in argv) == 1, argv
        # clients still name the model as before (vLLM's default served name is --model)
        assert flag_value(argv, "--served-model-name") == form[-1].split("=")[-1], argv
    argv = server_argv(["./ckpt", "--served-model-name", "mine"])
    assert flag_value(argv, "--served-model-name") == "mine", argv  # the user's one wins


def test_a_repeated_load_format_exits_2_in_one_line(tmp_path):
    from tests.unit.cli.test_preflight import refused

    (tmp_path / MANIFEST_NAME).write_text("{}")
    line = refused("serve", tmp_path, "--load-format", "secneuron", "--load_format", "auto")
    assert "--load-format is given more than once" in line, line


@pytest.mark.parametrize("form", [
    ["--api-server-count", "2"], ["--api-server-count=2"], ["--api_server_count", "4"],
    ["-asc", "2"], ["-asc=2"], ["--api-server-c", "2"],
])
def test_more_than_one_api_process_is_refused_not_ignored(tmp_path, form):
    """vLLM's api_server module (what serve runs) starts one API process whatever
    ``--api-server-count`` says: the soak (issue #32 item 14) found 2 silently served by 1."""
    from vllm_guard.cli.serve import server_argv

    with pytest.raises(GuardError, match="api-server-count|spell out"):
        server_argv([str(tmp_path), *form])
    assert "--api-server-count" in server_argv([str(tmp_path), "--api-server-count", "1"])
