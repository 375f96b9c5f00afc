"""Every option says what it does, and ``serve --help`` shows our options before vLLM's."""

from __future__ import annotations

import argparse

import pytest

from vllm_guard.cli import build_parser, main
from vllm_guard.cli.commands import COMMANDS


def command_parser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser(name)._actions
               if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_has_help_text(name):
    parser = command_parser(name)
    bare = [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions
            if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert bare == [], f"{name}: options without help text: {bare}"


def test_serve_help_prints_our_options_before_vllms(monkeypatch, capsys):
    execs: list[list[str]] = []

    def execve(path, argv, env):  # stands in for vLLM's 330-line --help
        print("VLLM HELP")
        execs.append(list(argv))
        raise SystemExit(0)

    monkeypatch.setattr("os.execve", execve)
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--grants" in out and "--masking" in out
    assert out.index("--grants") < out.index("VLLM HELP")
    assert "--help" in execs[0]  # vLLM's own options follow
