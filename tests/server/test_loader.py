"""``--load-format secneuron`` inside a real vLLM server, against plain vLLM and in-process
HF references.

The refusals (flipped byte, edited manifest, keys of another checkpoint, wrong key bytes) are
loader logic, checked in process in tests/unit/secneuron and tests/unit/loader; here
``vllm-guard serve`` refuses a wrong key in one line before vLLM starts.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from pathlib import Path

import httpx
from transformers import AutoTokenizer

from harness.fixtures import TASKS, format_example, task_examples
from harness.reference import hf_reference, locked_heads, locked_neurons
from harness.server import VllmServer
from tests.conftest import complete
from tests.servers import ENGINE_MARK, INJECTED_TEMPLATE, bearer, secneuron_args
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
    assert "open tasks ['add', 'capital', 'reverse', 'sealed']" in log
    assert "decrypted" in log and "GB/s" in log


def test_subset_equals_unlocked_checkpoint_and_hf_reference(loader_subset, art, tmp_path):
    guarded = outputs(loader_subset)
    assert "open tasks ['add']" in loader_subset.log_text()
    reference = hf_reference(art.unlocked, locked_neurons(art.locked, ["add"]), PROMPTS,
                             heads=locked_heads(art.locked, ["add"]))
    assert guarded == reference
    # what `unlock` writes for the same key computes the same (in process)
    unlocked = tmp_path / "add-only"
    unlock_checkpoint(art.locked, load_task_keys([art.key("add")]), unlocked)
    assert hf_reference(unlocked, {}, PROMPTS) == reference
    assert guarded != hf_reference(art.plain, {}, PROMPTS)  # the lock changed something


def test_a_side_file_changed_while_vllm_starts_never_reaches_it(loader_subset):
    """Issue #32 item 2 on a real start: ``loader_subset``'s checkpoint held an injected chat
    template from just after serve's checks until vLLM had read its tokenizer, then was put
    back (:func:`tests.servers.inject_template_after_exec`). vLLM renders chat with the
    checked template, never the injected one."""
    assert ENGINE_MARK in loader_subset.log_text()  # the window the attack used
    ckpt = Path(loader_subset.model)
    assert (ckpt / "chat_template.jinja").read_text() != INJECTED_TEMPLATE  # put back
    messages = [{"role": "user", "content": "hi"}]
    r = httpx.post(loader_subset.url + "/tokenize", timeout=30,
                   json={"model": "test", "messages": messages})
    assert r.status_code == 200, r.text
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    rendered = tokenizer.decode(r.json()["tokens"])
    assert "IGNORE" not in rendered
    assert rendered == tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=False)


def test_no_keys_serves_public_only_with_warning(loader_no_keys, art):
    assert "no task keys given: serving the PUBLIC-ONLY model" in loader_no_keys.log_text()
    assert outputs(loader_no_keys) == hf_reference(art.unlocked, locked_neurons(art.locked, []),
                                                   PROMPTS, heads=locked_heads(art.locked, []))


def test_wrong_key_refuses_to_start(art, tmp_path):
    """Right key id, wrong bytes: ``vllm-guard serve`` refuses with the loader's one line in
    seconds, before vLLM starts (it used to start a vLLM server that exited after ~45 s with
    four tracebacks). The loader's own in-engine refusal: unit/loader."""
    real = load_task_key(art.key("capital"))
    save_task_key(TaskKey("capital", real.key_id, bytes(32)), tmp_path / "wrong.key")
    config = {**art.loader_config(), "keys": [str(tmp_path / "wrong.key")]}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "vllm_guard.cli", "serve", str(art.locked),
                          *secneuron_args(config)],
                         capture_output=True, text=True, timeout=20)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert "task key 'capital'" in lines[0] and "does not open" in lines[0]
    assert time.monotonic() - start < 20 and "Traceback" not in out.stderr
    key = load_task_key(art.key("capital")).key
    assert key.hex() not in out.stderr and base64.b64encode(key).decode() not in out.stderr


def test_key_material_never_in_server_logs(art, grants_eager, loader_subset, loader_no_keys):
    logs = [s.log_text() for s in (grants_eager, loader_subset, loader_no_keys)]
    for path in art.key_dir.glob("*.key"):
        key = load_task_key(path).key
        for form in (key.hex(), base64.b64encode(key).decode(), key.hex().upper()):
            assert all(form not in log for log in logs), path.name
