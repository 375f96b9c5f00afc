"""The layout: no import cycles between subpackages or between modules, no test, benchmark or
harness code in the product, the harness beneath tests and benchmarks (benchmarks never
import tests; tests import benchmarks only in tests/pipelines), and a wheel that ships only
the product and works without a source checkout."""

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
NOT_PRODUCT = ("tests", "benchmarks", "harness", "conftest")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """Imports under ``if TYPE_CHECKING:``: they never run, so they make no cycle."""
    out: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                out.update(ast.walk(child))
    return out


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or lazily inside functions."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_only(tree)
    for node in ast.walk(tree):
        if node in skip:
            continue
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


def module_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of the product it imports (a package's ``__init__`` is a module
    too; ``from pkg import name`` counts as importing ``pkg.name`` when that is a module)."""
    modules = {_module_name(p): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        deps = set()
        for imported in _imports(path):
            # "from a.b import c" yields a.b and a.b.c: keep what names a module
            if imported in modules and imported != mod:
                deps.add(imported)
        graph[mod] = deps
    return graph


def imports_of_tree(tree: str) -> dict[str, set[str]]:
    """File (relative to the checkout) -> top-level packages it imports, for a source tree."""
    out = {}
    for path in sorted((ROOT / tree).rglob("*.py")):
        out[str(path.relative_to(ROOT))] = {m.split(".")[0] for m in _imports(path)}
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


def test_no_cycles_between_modules():
    graph = module_graph()
    assert len(graph) > 50 and graph["vllm_guard.loader.secneuron_loader"], "walker is broken"
    assert not cycles(graph), cycles(graph)


def test_module_cycle_check_fails_on_a_cycle(tmp_path, monkeypatch):
    """Two modules that import each other, one of them only inside a function."""
    pkg = tmp_path / "vllm_guard"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from vllm_guard.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from vllm_guard.sub.a import x\n")
    (pkg / "sub" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vllm_guard.sub import a\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    graph = module_graph(pkg)
    assert cycles(graph) == [["vllm_guard.sub.a", "vllm_guard.sub.b"]]


def test_harness_tests_and_benchmarks_import_in_one_direction():
    """harness imports neither tests nor benchmarks; benchmarks never import tests; tests
    import benchmarks only in tests/pipelines; the product imports none of them."""
    bad = []
    for f, mods in imports_of_tree("harness").items():
        bad += [f"{f} imports {m}" for m in mods & {"tests", "benchmarks"}]
    for f, mods in imports_of_tree("benchmarks").items():
        bad += [f"{f} imports tests" for m in mods if m == "tests"]
    for f, mods in imports_of_tree("tests").items():
        if "benchmarks" in mods and not f.startswith("tests/pipelines/"):
            bad.append(f"{f} imports benchmarks outside tests/pipelines")
    for f, mods in imports_of_tree("vllm_guard").items():
        bad += [f"{f} imports {m}" for m in mods & {"tests", "benchmarks", "harness"}]
    assert not bad, bad


def test_direction_check_sees_a_wrong_import(tmp_path, monkeypatch):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "b.py").write_text("from tests.conftest import LOG_DIR\n")
    (tmp_path / "vllm_guard").mkdir()
    (tmp_path / "vllm_guard" / "p.py").write_text("def f():\n    import harness.server\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    assert imports_of_tree("benchmarks") == {"benchmarks/b.py": {"tests"}}
    assert imports_of_tree("vllm_guard") == {"vllm_guard/p.py": {"harness"}}


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
    # no PYTHONPATH: with a checkout on it, pip finds vllm_guard installed and skips the wheel
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VLLM_GUARD_CACHE")}
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120, env=env)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "--quiet", "--no-deps", str(wheel)], check=True,
                   capture_output=True, timeout=300, env=env)
    site = _site_packages(venv)
    (site / "deps.pth").write_text(str(Path(sysconfig.get_path("purelib"))) + "\n")
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
