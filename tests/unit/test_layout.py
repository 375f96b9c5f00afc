"""The package layout: no import cycles between subpackages, no test or benchmark code in the
product, and a wheel that ships only the product and works without a source checkout."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "vllm_guard"
NOT_PRODUCT = ("tests", "benchmarks", "conftest")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or lazily inside functions."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # "from pkg import module"
    return out


def _unit(module: str) -> str | None:
    """The subpackage (or top-level module) of vllm_guard a module belongs to."""
    parts = module.split(".")
    if parts[0] != "vllm_guard" or len(parts) < 2:
        return None
    unit = parts[1]
    exists = (PACKAGE / unit).is_dir() or (PACKAGE / f"{unit}.py").is_file()
    return unit if exists else None


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    graph: dict[str, set[str]] = {}
    foreign: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = _unit(_module_name(path))
        for mod in _imports(path):
            if mod.split(".")[0] in NOT_PRODUCT:
                foreign.append(f"{path.relative_to(ROOT)} imports {mod}")
            dst = _unit(mod)
            if src and dst and dst != src:
                graph.setdefault(src, set()).add(dst)
    return graph, foreign


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_cycles_between_subpackages_and_no_test_code_in_the_product():
    graph, foreign = import_graph()
    assert graph, "the import graph came out empty: the walker is broken"
    assert {"runtime"} <= graph["kernels"] and {"runtime"} <= graph["loader"]
    assert not foreign, foreign
    assert not cycles(graph), cycles(graph)


def test_runtime_state_has_no_dependents_inside_it():
    graph, _ = import_graph()
    # the loader, the masked op and the runner hook meet only in vllm_guard.runtime
    assert "kernels" not in graph.get("loader", set())
    assert "grants" not in graph.get("kernels", set()) | graph.get("loader", set())
    assert graph.get("runtime", set()) <= {"log", "errors"}


def _site_packages(venv: Path) -> Path:
    rel = Path(sysconfig.get_path("purelib")).relative_to(sys.prefix)
    return venv / rel


def test_wheel_ships_only_the_product_and_works_without_a_checkout(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(dist), str(ROOT)],
                   check=True, capture_output=True, timeout=300, cwd=tmp_path)
    (wheel,) = dist.glob("vllm_guard-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"vllm_guard", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1]
                    + ".dist-info"}, tops
    assert not [n for n in names if "/testing/" in n or "/support/" in n
                or n.startswith(("tests/", "benchmarks/"))]
    assert "vllm_guard/configs/masking.json" in names
    assert "vllm_guard/configs/sensitive_terms.txt" in names

    # A fresh venv with the wheel and no checkout; dependencies come from ours through a
    # .pth path entry (which does not run our editable-install hook, so the source tree
    # stays invisible).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "--quiet", "--no-deps", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    site = _site_packages(venv)
    (site / "deps.pth").write_text(str(Path(sysconfig.get_path("purelib"))) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VLLM_GUARD_CACHE")}
    env["HOME"] = str(tmp_path / "home")

    run = subprocess.run([str(venv / "bin" / "vllm-guard"), "demo", "--help"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "--port" in run.stdout, run.stderr[-2000:]
    probe = (
        "import vllm_guard, sys\n"
        "from vllm_guard import configs, envs\n"
        "from vllm_guard.masking.config import MaskingConfig\n"
        "from vllm_guard.grants.credentials import GrantsConfig\n"
        "assert vllm_guard.__file__.startswith(sys.prefix), vllm_guard.__file__\n"
        f"assert {str(ROOT)!r} not in sys.path, sys.path\n"
        "m = MaskingConfig.load(configs.path('masking.json'))\n"
        "assert m.terms_file.startswith(sys.prefix), m.terms_file\n"
        "GrantsConfig.load(configs.path('grants.example.json'))\n"
        "print(envs.cache_dir())\n"
    )
    run = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == str(tmp_path / "home" / ".cache" / "vllm-guard")
