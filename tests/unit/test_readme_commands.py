"""Issue #32 item 9: every shell command the README prints (its ```bash blocks) is accepted as
printed. Each command is parsed by the parser of the program it names, in process, and
stopped before it does any work; nothing here starts a server or trains a model:

- ``vllm-guard CMD ...``: the CLI's own ``main`` (its real parser, its check of leftover
  options), with the command's handler swapped for a recorder; ``serve``'s forwarded options
  then go through vLLM's own server parser and ``validate_parsed_serve_args``;
- ``vllm serve ...``: vLLM's server parser, and each ``--middleware`` class imported;
- ``python -m MODULE ...``: the module's ``main``, stopped in its ``ArgumentParser.parse_args``;
- ``export NAME=...``: run in bash (the README's ``$(python -c ...)`` really runs), and each
  NAME must be a variable vllm-guard or vLLM reads;
- ``make TARGET``: ``make -n`` (the targets take minutes: setup, demo build, the suite).

README notation: ``[...]`` around options means optional (checked as if given), a ``...``
argument means "the rest as above" (required options are not demanded), ``'{...}'`` is a
JSON object left out (checked as ``{}``).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import inspect
import os
import re
import runpy
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


class _Parsed(Exception):
    """Raised once a parser accepted the arguments: the program stops before any work."""

    def __init__(self, ns: argparse.Namespace) -> None:
        super().__init__("parsed")
        self.ns = ns


def readme_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) for each command line of each ```bash block; continuation
    lines joined, comment lines dropped."""
    out: list[tuple[int, str]] = []
    in_bash, pending, start = False, [], 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_bash = not in_bash and line.strip() == "```bash"
            continue
        if not in_bash:
            continue
        start = start if pending else n
        pending.append(line.rstrip().removesuffix("\\"))
        if line.rstrip().endswith("\\"):
            continue
        command = " ".join(pending).strip()
        if command and not command.startswith("#"):
            out.append((start, command))
        pending = []
    return out


# an inline `span` is a command (not a mention of a program) when it names one of these
# and gives it more than a subcommand
_INLINE = re.compile(r"(?<!`)`((?:vllm-guard|vllm serve|(?:\.venv/bin/)?python3? -m|make|pip|"
                     r"scripts/)[^`]*)`(?!`)")


def inline_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) for each command in `backticks` outside code blocks."""
    out: list[tuple[int, str]] = []
    in_block = False
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            continue
        for span in _INLINE.findall(line):
            words = span.split()
            first = Path(words[0]).name
            least = {"vllm-guard": 3, "vllm": 3, "make": 2, "pip": 3}.get(first, 1)
            if first.startswith("python"):
                least = 3
            if first == "vllm-guard" and re.fullmatch(r"\d+\.\d+\.\d+", (words + [""])[1]):
                continue  # a log line (`vllm-guard 0.1.0 registered in ...`)
            if len(words) >= least or (first == "vllm-guard" and words[-1].startswith("-")):
                out.append((n, span))
    return out


def _words(command: str) -> tuple[list[str], bool]:
    """The command's words (comments dropped, optional brackets opened, ``'{...}'`` as ``{}``)
    and whether it abbreviates with ``...``."""
    words = shlex.split(command.replace("{...}", "{}"), comments=True)
    abbreviated = "..." in words
    words = [w for w in words if w != "..."]
    opened, out = False, []
    for w in words:  # `[--opt V --opt2 W]`: optional options, checked as if given
        if w.startswith("[-"):
            opened, w = True, w[1:]
        if opened and w.endswith("]"):
            opened, w = False, w[:-1]
        out.append(w)
    return out, abbreviated


def _stop_after_parsing(monkeypatch: pytest.MonkeyPatch, *, relax_required: bool,
                        on_func: Callable[[argparse.Namespace], int] | None = None) -> None:
    """Make every ArgumentParser stop its program once it has parsed: ``parse_args`` raises
    _Parsed; with ``on_func``, ``parse_known_args`` instead swaps a subcommand's handler."""
    known = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        if relax_required:
            for action in self._actions:
                if action.option_strings:
                    action.required = False
        ns, rest = known(self, args, namespace)
        if on_func is not None and hasattr(ns, "func"):
            ns.func = on_func
        return ns, rest

    def parse_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        ns, rest = parse_known_args(self, args, namespace)
        if rest:
            self.error(f"unrecognized arguments: {' '.join(rest)}")
        raise _Parsed(ns)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)
    if on_func is None:
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)


def _vllm_serve_args(args: list[str]) -> argparse.Namespace:
    """``args`` parsed by the parser of vLLM's OpenAI server, and its pre-load checks."""
    try:  # vLLM 0.33 moved the server's argument parser
        from vllm.entrypoints.common.cli_args import make_arg_parser, validate_parsed_serve_args
    except ImportError:
        from vllm.entrypoints.launchers.cli_args import (
            make_arg_parser,
            validate_parsed_serve_args,
        )
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    try:
        ns = parser.parse_args(args)
    except SystemExit as e:
        raise AssertionError(f"vLLM's server parser refuses {args}") from e
    validate_parsed_serve_args(ns)
    for dotted in ns.middleware or []:  # the class must exist where the README says
        module, _, name = dotted.rpartition(".")
        assert hasattr(importlib.import_module(module), name), f"no middleware {dotted}"
    return ns


def check_vllm_guard(words: list[str], abbreviated: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_guard.cli import main
    from vllm_guard.cli.serve import GRANT_MIDDLEWARE, MASKING_MIDDLEWARE

    seen: list[argparse.Namespace] = []
    _stop_after_parsing(monkeypatch, relax_required=abbreviated,
                        on_func=lambda ns: seen.append(ns) or 0)
    try:
        rc = main(words[1:])
    except SystemExit as e:  # argparse's usage error
        raise AssertionError(f"vllm-guard refuses: {' '.join(words)}") from e
    assert rc == 0 and len(seen) == 1, f"vllm-guard did not accept: {' '.join(words)}"
    ns = seen[0]
    if getattr(ns, "forwards_unknown", False):  # serve: the rest goes to vLLM unchanged
        rest = list(ns.vllm_args)
        if rest and not rest[0].startswith("-"):
            rest = ["--model", rest[0], *rest[1:]]  # as serve.server_argv does
        for flag, middleware in (("grants", GRANT_MIDDLEWARE), ("masking", MASKING_MIDDLEWARE)):
            if getattr(ns, flag, None):
                rest += ["--middleware", middleware]
        _vllm_serve_args(rest)


def check_vllm(words: list[str], abbreviated: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    assert words[1:2] == ["serve"], f"only `vllm serve` is checked: {' '.join(words)}"
    _vllm_serve_args(words[2:])


def check_python_module(words: list[str], abbreviated: bool,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    assert words[1] == "-m", f"only `python -m MODULE` is checked: {' '.join(words)}"
    name, argv = words[2], words[3:]
    if name == "pytest":  # not run: the suite inside the suite; its paths must exist
        for arg in argv:
            assert arg.startswith("-") or (ROOT / arg.split("::")[0]).exists(), f"no {arg}"
        return
    spec = importlib.util.find_spec(name)
    assert spec is not None, f"no module {name}"
    if spec.submodule_search_locations:  # a package: its __main__ runs main() on import
        source = importlib.util.find_spec(f"{name}.__main__")
        assert source is not None, f"{name} has no __main__"
        run: Callable[[], object] = functools.partial(runpy.run_module, name,
                                                      run_name="__main__")
    else:
        module = importlib.import_module(name)  # not run: __name__ is not __main__
        main = getattr(module, "main", None)
        if main is None or "parse_args" not in inspect.getsource(module):
            assert not argv, f"{name} has no argument parser, yet the README passes {argv}"
            return
        run = functools.partial(main, argv) if inspect.signature(main).parameters else main
    _stop_after_parsing(monkeypatch, relax_required=abbreviated)
    monkeypatch.setattr(sys, "argv", [name, *argv])
    try:
        run()
    except _Parsed:
        return
    except SystemExit as e:
        raise AssertionError(f"{name}'s parser refuses {argv}") from e
    raise AssertionError(f"{name} returned without parsing its arguments")


def check_export(command: str) -> None:
    from vllm import envs as vllm_envs

    from vllm_guard import envs

    ours = {v for k, v in vars(envs).items() if k.isupper() and isinstance(v, str)}
    names = re.findall(r"\b([A-Z][A-Z0-9_]*)=", command)
    assert names, command
    for name in names:
        assert name in ours or name in vllm_envs.environment_variables, (
            f"the README exports {name}, which neither vllm-guard nor vLLM reads")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = command + "".join(f'; printf "%s\\n" "${name}"' for name in names)
    r = subprocess.run(["bash", "-euc", script], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=30)
    assert r.returncode == 0 and all(r.stdout.splitlines()), f"{command}: {r.stderr}"
    if envs.SCRUB_KEY in names:  # the key the README makes must be one scrub accepts
        import base64

        value = r.stdout.splitlines()[names.index(envs.SCRUB_KEY)]
        assert len(base64.b64decode(value, validate=True)) == 32


def check_pip(words: list[str]) -> None:
    """pip's own parser; an editable install of this checkout names extras it declares."""
    # setuptools first: pip alone would load the stdlib distutils, which setuptools (imported
    # by vLLM later in this process) then refuses
    import setuptools  # noqa: F401
    from pip._internal.commands import create_command

    try:
        options, args = create_command(words[1]).parse_args(words[2:])
    except (SystemExit, Exception) as e:
        raise AssertionError(f"pip refuses {' '.join(words)}: {e}") from e
    targets = [*getattr(options, "editables", []), *args]
    pyproject = (ROOT / "pyproject.toml").read_text()
    block = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    declared = set(re.findall(r"^([a-z0-9-]+) = \[", block, re.M))
    for target in targets:
        m = re.fullmatch(r"\.\[([a-z0-9,-]+)\]", target)
        if m:
            unknown = set(m[1].split(",")) - declared
            assert not unknown, f"pyproject.toml declares no extra {sorted(unknown)}"


def check_script(words: list[str]) -> None:
    # not run: scripts/setup.sh installs into .venv (minutes), run_tests.sh runs the suite
    script = ROOT / words[0]
    assert script.is_file() and os.access(script, os.X_OK), f"{words[0]} is not executable"
    assert not words[1:], f"{words[0]} takes no arguments"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def check_make(words: list[str]) -> None:
    # not run: `make demo`/`make test` set up .venv and build and serve or test for minutes
    r = subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, f"make has no target {words[1:]}: {r.stderr}"


def check(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if command.startswith("export "):
        check_export(command)
        return
    words, abbreviated = _words(command)
    program = Path(words[0]).name
    if program == "vllm-guard":
        check_vllm_guard(words, abbreviated, monkeypatch)
    elif program == "vllm":
        check_vllm(words, abbreviated, monkeypatch)
    elif re.fullmatch(r"python3?(\.\d+)?", program):
        check_python_module(words, abbreviated, monkeypatch)
    elif program == "make":
        check_make(words)
    elif program == "pip":
        check_pip(words)
    elif words[0].startswith("scripts/"):
        check_script(words)
    else:
        raise AssertionError(f"the README prints `{command}`, which this test cannot check: "
                             "teach check() its program")


def _readme() -> Iterator[tuple[int, str]]:
    text = README.read_text()
    yield from sorted(readme_commands(text) + inline_commands(text))


@pytest.mark.parametrize(("line", "command"), list(_readme()),
                         ids=[f"README:{n}" for n, _ in _readme()])
def test_readme_command_is_accepted(line: int, command: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    check(command, monkeypatch)


def test_the_readme_prints_commands_of_each_kind() -> None:
    programs = {Path(_words(c)[0][0]).name for _, c in _readme() if not c.startswith("export ")}
    assert {"vllm-guard", "vllm", "make", "python"} <= programs


@pytest.mark.parametrize("command", [
    "vllm-guard keygen --task add --outfile keys/add.key",  # no such option
    "vllm-guard lock --model M --selection sel.json",  # required options missing
    "vllm-guard serve /models/locked --gpu-memory-utilisation 0.3",  # vLLM has no such option
    "vllm-guard serve /models/locked --load-format secneuron --gpu-memory-utilization lots",
    "vllm serve /models/locked --middleware vllm_guard.masking.middleware.NoSuchMiddleware",
    "export VLLM_GUARD_GRANT=grants.json",  # a variable nobody reads
    ".venv/bin/python -m benchmarks --preset qwen2-0.5b-shape --mode fulll",
    ".venv/bin/python -m benchmarks.bench_components --kernel-only --fast",
    "make no-such-target",
    "curl http://127.0.0.1:8000/v1/models",  # a program the test does not know
    'pip install -e ".[cpu,nosuchextra]"',
    "pip install --no-such-option x",
    ".venv/bin/python -m pytest tests/nosuchtier",
    "scripts/nosuch.sh",
])
def test_a_command_the_programs_refuse_fails(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AssertionError):
        check(command, monkeypatch)
