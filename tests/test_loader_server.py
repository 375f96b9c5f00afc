"""``--load-format secneuron`` inside a real vLLM server, against plain vLLM and HF references."""

from __future__ import annotations

import base64
import json
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.conftest import complete, start_server
from tests.support.fixtures import TASKS, format_example, task_examples
from tests.support.locked import locked_fixture
from vllm_guard.errors import ManifestError
from vllm_guard.secneuron.keys import (
    TaskKey,
    load_task_key,
    load_task_keys,
    save_task_key,
)
from vllm_guard.secneuron.lock import lock_checkpoint
from vllm_guard.secneuron.manifest import MANIFEST_NAME, read_manifest
from vllm_guard.secneuron.selection import Selection
from vllm_guard.secneuron.unlock import unlock_checkpoint

pytestmark = pytest.mark.server

PROMPTS = [format_example(ex["prompt"]) for t in sorted(TASKS)
           for ex in task_examples(t, 7, seed=99)] + [format_example("hello"), "capital of"]
PLAIN_ENV = {"VLLM_PLUGINS": "__no_plugin__"}  # plain vLLM: our plugin is not loaded


@pytest.fixture(scope="module")
def art():
    art = locked_fixture()
    try:
        read_manifest(art.locked)
    except ManifestError:  # cached before manifests signed every file: lock it again
        relock_cached(art)
    return art


def relock_cached(art) -> None:
    """Lock the cached demo fixture again (same keys and selection) in the current format."""
    fresh = art.locked.with_name("locked.relock")
    shutil.rmtree(fresh, ignore_errors=True)
    lock_checkpoint(art.plain, Selection.load(art.selection), load_task_keys([art.key_dir]),
                    fresh, art.keys.signer(), progress=False)
    shutil.rmtree(art.locked)
    fresh.rename(art.locked)


def secneuron_args(config: dict) -> list[str]:
    return ["--enforce-eager", "--load-format", "secneuron",
            "--model-loader-extra-config", json.dumps(config)]


def outputs_of(name: str, model, args=(), guard=True, env=None) -> tuple[list[str], str]:
    srv = start_server(name, model, list(args), guard=guard, env=env)
    try:
        srv.wait_ready()
        return [complete(srv, p) for p in PROMPTS], srv.log_text()
    finally:
        srv.stop()


def hf_reference(model_dir: Path, zeroed: dict[int, list[int]]) -> list[str]:
    """Greedy outputs of HF transformers with the given FFN neurons zeroed at down_proj input."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for layer, idx in zeroed.items():
        index = torch.tensor(idx, dtype=torch.long)

        def hook(_m, args, index=index):
            x = args[0].clone()
            x[..., index] = 0
            return (x,)

        model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(hook)
    outs = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        outs.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return outs


def locked_neurons(locked: Path, granted: list[str]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for g in read_manifest(locked).groups:
        if not set(g.policy) & set(granted):
            for layer, idx in g.neurons.items():
                out.setdefault(layer, []).extend(idx)
    return out


LOGS: list[str] = []


def test_all_keys_equals_plain_vllm_on_original(art):
    guarded, log = outputs_of("loader_all_keys", art.locked, secneuron_args(art.loader_config()))
    LOGS.append(log)
    plain, _ = outputs_of("loader_plain_original", art.plain, ["--enforce-eager"], guard=False,
                          env=PLAIN_ENV)
    assert len(PROMPTS) >= 20
    assert guarded == plain
    assert "open tasks ['add', 'capital', 'reverse']" in log
    assert "decrypted" in log and "GB/s" in log


def test_subset_equals_unlocked_checkpoint_and_hf_reference(art, tmp_path_factory):
    granted = ["add"]
    guarded, log = outputs_of("loader_subset", art.locked,
                              secneuron_args(art.loader_config(granted)))
    LOGS.append(log)
    assert "open tasks ['add']" in log
    unlocked = tmp_path_factory.mktemp("unlocked") / "add-only"
    unlock_checkpoint(art.locked, load_task_keys([art.key("add")]), unlocked)
    plain, _ = outputs_of("loader_plain_unlocked", unlocked, ["--enforce-eager"], guard=False,
                          env=PLAIN_ENV)
    assert guarded == plain
    assert guarded == hf_reference(art.plain, locked_neurons(art.locked, granted))
    full = hf_reference(art.plain, {})
    assert guarded != full  # the lock changed something: the test can fail


def test_no_keys_serves_public_only_with_warning(art):
    guarded, log = outputs_of("loader_no_keys", art.locked,
                              secneuron_args({"publisher_key": str(art.publisher_pub)}))
    LOGS.append(log)
    assert "no task keys given: serving the PUBLIC-ONLY model" in log
    assert guarded == hf_reference(art.plain, locked_neurons(art.locked, []))


def expect_start_failure(name: str, model: Path, config: dict) -> str:
    srv = start_server(name, model, secneuron_args(config))
    try:
        deadline = time.monotonic() + 300
        while srv.proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(srv.url + "/health", timeout=1) as r:
                    pytest.fail(f"server became healthy (status {r.status}) with bad input")
            except OSError:
                time.sleep(0.5)
        assert srv.proc.poll() not in (None, 0), "server did not exit with an error"
        return srv.log_text()
    finally:
        srv.stop()


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_bad_inputs_refuse_to_start(art, tmp_path):
    cfg = art.loader_config()
    # 1. wrong key: right key id, wrong bytes
    real = load_task_key(art.key("capital"))
    save_task_key(TaskKey("capital", real.key_id, bytes(32)), tmp_path / "wrong.key")
    log = expect_start_failure("loader_wrong_key", art.locked,
                               {**cfg, "keys": [str(tmp_path / "wrong.key")]})
    assert "refusing to load" in log and "task key 'capital'" in log and "does not open" in log

    # 2. one flipped byte in a public weight (the embeddings): the signed file hash refuses
    #    (ciphertext bytes too; their AEAD tags are checked in process, test_signed_checkpoint)
    bad = _copy(art.locked, tmp_path / "badbyte")
    raw = bytearray((bad / "model.safetensors").read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start = json.loads(raw[8:8 + n])["model.embed_tokens.weight"]["data_offsets"][0]
    raw[8 + n + start + 3] ^= 0x80
    (bad / "model.safetensors").write_bytes(bytes(raw))
    log = expect_start_failure("loader_flipped_public_byte", bad, cfg)
    refusal = [line for line in log.splitlines() if "refusing to load" in line]
    assert refusal and "file model.safetensors does not match its signed SHA-256" in refusal[0]

    # 3. tampered manifest
    edited = _copy(art.locked, tmp_path / "edited")
    doc = json.loads((edited / MANIFEST_NAME).read_text())
    doc["body"]["groups"][0]["policy"] = sorted(TASKS)
    (edited / MANIFEST_NAME).write_text(json.dumps(doc))
    log = expect_start_failure("loader_tampered", edited, cfg)
    assert "manifest signature does not verify" in log

    # 4. keys of a different checkpoint (same tasks, locked again with other keys)
    other_keys = {t: TaskKey.generate(t) for t in TASKS}
    for t, k in other_keys.items():
        save_task_key(k, tmp_path / f"other-{t}.key")
    lock_checkpoint(art.plain, Selection.load(art.selection), other_keys, tmp_path / "other",
                    None, progress=False)
    log = expect_start_failure("loader_other_ckpt", art.locked,
                               {**cfg, "keys": [str(tmp_path / "other-add.key")]})
    assert "key for a different checkpoint" in log


def test_key_material_never_in_server_logs(art):
    assert LOGS, "run with the server tests above"
    for path in art.key_dir.glob("*.key"):
        key = load_task_key(path).key
        for form in (key.hex(), base64.b64encode(key).decode(), key.hex().upper()):
            assert all(form not in log for log in LOGS), path.name
