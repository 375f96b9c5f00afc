"""The CLI imports a command's module only when it runs, and no command drags in torch,
transformers, Presidio, spaCy or vLLM before it needs them: ``keygen --help`` and serve's
checks before it execs vLLM stay well under a second.

Each check runs in a fresh interpreter, since this test process has long imported them all.
Self-contained (vllm_guard, stdlib and pytest only).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import vllm_guard

HEAVY = ("torch", "transformers", "presidio_analyzer", "vllm", "spacy")
# the vllm_guard under test, wherever this file is moved to
ROOT = Path(vllm_guard.__file__).resolve().parents[1]

# prints which of HEAVY the code before it left in sys.modules, as the last line
REPORT = ("\nimport json, sys\n"
          f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n")


def fresh_python(code: str, env: dict[str, str] | None = None) -> tuple[list[str], str]:
    """Run ``code`` in a new interpreter; (the heavy modules it loaded, its stdout)."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT),
                                                         full_env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code) + REPORT],
                         capture_output=True, text=True, timeout=120, env=full_env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    *_, last = out.stdout.strip().splitlines()
    return json.loads(last), out.stdout


def serve_until_exec(argv: list[str], env: dict[str, str] | None = None
                     ) -> tuple[list[str], str]:
    """``vllm-guard serve`` in a new interpreter, stopped where it would exec vLLM's server
    (printed as ``EXEC argv``): (the heavy modules it loaded, its stdout)."""
    return fresh_python(f"""
        import os

        def execve(path, argv, env):  # stands in for exec'ing vLLM's server
            print("EXEC", *argv)
            raise SystemExit(0)

        os.execve = execve
        from vllm_guard.cli import main
        try:
            main({argv!r})
        except SystemExit as e:
            assert e.code == 0, e.code
    """, env)


def test_keygen_help_imports_no_heavy_module():
    loaded, stdout = fresh_python("""
        from vllm_guard.cli import main
        try:
            main(["keygen", "--help"])
        except SystemExit as e:
            assert e.code == 0, e.code
    """)
    assert "--signing" in stdout  # keygen's own parser answered
    assert loaded == [], f"keygen --help imported {loaded}"


def test_every_command_module_is_cheap_to_import():
    loaded, _ = fresh_python("""
        import importlib
        from vllm_guard.cli.commands import COMMANDS

        for command in COMMANDS.values():
            importlib.import_module(command.module)
    """)
    assert loaded == [], f"importing the command modules imported {loaded}"


@pytest.mark.parametrize("extra", [["--help"], ["MODEL", "--grants", "GRANTS", "--masking",
                                                "MASKING", "--port", "9"]],
                         ids=["help", "grants+masking"])
def test_serve_checks_before_exec_import_no_heavy_module(tmp_path: Path, extra: list[str]):
    """Everything serve does before it execs vLLM (config checks, vLLM version, argv) runs in
    the parent process, which must stay light: vLLM is imported by the exec'd server only."""
    grants = tmp_path / "grants.json"
    grants.write_text(json.dumps({"mode": "required", "api_keys": [], "revoked": []}))
    masking = tmp_path / "masking.json"  # strategies and languages: the whole config check
    masking.write_text(json.dumps({"strategies": {"CREDIT_CARD": "fpe", "PERSON": "surrogate"},
                                   "ner_languages": {"fr": "fr_core_news_sm"}}))
    (tmp_path / "model").mkdir()
    names = {"MODEL": str(tmp_path / "model"), "GRANTS": str(grants), "MASKING": str(masking)}
    argv = ["serve", *(names.get(a, a) for a in extra)]
    loaded, stdout = serve_until_exec(
        argv, env={"VLLM_GUARD_FPE_KEY": base64.b64encode(bytes(32)).decode()})
    exec_line = next(line for line in stdout.splitlines() if line.startswith("EXEC "))
    assert "vllm.entrypoints.openai.api_server" in exec_line
    if "--port" in extra:  # vLLM's options still go through, after our middlewares
        assert "--port 9" in exec_line and "GrantMiddleware" in exec_line
        assert "MaskingMiddleware" in exec_line
    assert loaded == [], f"serve {' '.join(extra)} imported {loaded} before exec'ing vLLM"


def test_help_lists_every_command_and_each_module_registers_its_own():
    import argparse

    from vllm_guard.cli import build_parser
    from vllm_guard.cli.commands import COMMANDS

    text = " ".join(build_parser().format_help().split())  # argparse wraps the help lines
    for name, command in COMMANDS.items():
        assert " ".join(command.help.split()) in text, name
        parser = build_parser(name)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        assert list(sub.choices) == list(COMMANDS), name  # same names, same order
        assert callable(sub.choices[name].get_default("func")), name  # the real parser
