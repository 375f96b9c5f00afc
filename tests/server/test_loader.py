"""``--load-format secneuron`` inside a real vLLM server, against plain vLLM and in-process
HF references.

The refusals (flipped byte, edited manifest, keys of another checkpoint, wrong key bytes) are
loader logic, checked in process in tests/unit/secneuron; one refused start here shows that a
refusal stops a real server with its one line.
"""

from __future__ import annotations

import base64
import time
import urllib.request
from pathlib import Path

import pytest

from harness.fixtures import TASKS, format_example, task_examples
from harness.reference import hf_reference, locked_neurons
from harness.server import VllmServer
from tests.conftest import LOG_DIR, complete
from tests.servers import bearer, secneuron_args
from vllm_guard.secneuron.keys import TaskKey, load_task_key, load_task_keys, save_task_key
from vllm_guard.secneuron.unlock import unlock_checkpoint

PROMPTS = [format_example(ex["prompt"]) for t in sorted(TASKS)
           for ex in task_examples(t, 7, seed=99)] + [format_example("hello"), "capital of"]


def outputs(server: VllmServer, headers: dict[str, str] | None = None) -> list[str]:
    return [complete(server, p, headers=headers) for p in PROMPTS]


def test_plain_vllm_agrees_with_the_in_process_reference(plain_server, art):
    """The one check that the HF references the server tests compare against are what plain
    vLLM computes."""
    assert len(PROMPTS) >= 20
    assert outputs(plain_server) == hf_reference(art.plain, {}, PROMPTS)


def test_all_keys_equals_plain_vllm_on_original(grants_eager, plain_server):
    guarded = outputs(grants_eager, bearer("all"))
    assert guarded == outputs(plain_server)
    log = grants_eager.log_text()
    assert "open tasks ['add', 'capital', 'reverse']" in log
    assert "decrypted" in log and "GB/s" in log


def test_subset_equals_unlocked_checkpoint_and_hf_reference(loader_subset, art, tmp_path):
    guarded = outputs(loader_subset)
    assert "open tasks ['add']" in loader_subset.log_text()
    reference = hf_reference(art.plain, locked_neurons(art.locked, ["add"]), PROMPTS)
    assert guarded == reference
    # what `unlock` writes for the same key computes the same (in process)
    unlocked = tmp_path / "add-only"
    unlock_checkpoint(art.locked, load_task_keys([art.key("add")]), unlocked)
    assert hf_reference(unlocked, {}, PROMPTS) == reference
    assert guarded != hf_reference(art.plain, {}, PROMPTS)  # the lock changed something


def test_no_keys_serves_public_only_with_warning(loader_no_keys, art):
    assert "no task keys given: serving the PUBLIC-ONLY model" in loader_no_keys.log_text()
    assert outputs(loader_no_keys) == hf_reference(art.plain, locked_neurons(art.locked, []),
                                                   PROMPTS)


def expect_start_failure(name: str, model: Path, config: dict) -> str:
    srv = VllmServer(str(model), list(secneuron_args(config)), LOG_DIR / f"{name}.log").start()
    try:
        deadline = time.monotonic() + 300
        while srv.proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(srv.url + "/health", timeout=1) as r:
                    pytest.fail(f"server became healthy (status {r.status}) with bad input")
            except OSError:
                time.sleep(0.5)
        assert srv.proc.poll() not in (None, 0), "server did not exit with an error"
        srv.wait_exit(10)
        return srv.log_text()
    finally:
        srv.stop()


def test_wrong_key_refuses_to_start(art, tmp_path):
    """Right key id, wrong bytes: the server exits with the loader's one line."""
    real = load_task_key(art.key("capital"))
    save_task_key(TaskKey("capital", real.key_id, bytes(32)), tmp_path / "wrong.key")
    log = expect_start_failure("loader_wrong_key", art.locked,
                               {**art.loader_config(), "keys": [str(tmp_path / "wrong.key")]})
    assert "refusing to load" in log and "task key 'capital'" in log and "does not open" in log


def test_key_material_never_in_server_logs(art, grants_eager, loader_subset, loader_no_keys):
    logs = [s.log_text() for s in (grants_eager, loader_subset, loader_no_keys)]
    refused = LOG_DIR / "loader_wrong_key.log"  # when the refusal test ran in this session
    logs += [refused.read_text(errors="replace")] if refused.exists() else []
    for path in art.key_dir.glob("*.key"):
        key = load_task_key(path).key
        for form in (key.hex(), base64.b64encode(key).decode(), key.hex().upper()):
            assert all(form not in log for log in logs), path.name
