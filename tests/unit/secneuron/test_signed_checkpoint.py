"""Signed content: every file the server reads, the key ring and the version are signed.

Attacks first (each succeeded before the manifest signed files, key ring and version): flipped
bytes in any served file, spliced parts of older manifests, rotation without revocation,
rollback. The loader is driven in process (``SecNeuronModelLoader.load_weights`` with a model
that records what it is given); ``tests/test_loader_server.py`` has the real-server check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import subprocess
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from vllm.config.load import LoadConfig

from harness.fixtures import PRESETS, build_fixture
from tests.unit.secneuron.test_toolchain import TASKS, cli, keys_for
from vllm_guard.errors import DecryptionError, KeyFileError, ManifestError, SignatureError
from vllm_guard.loader.secneuron_loader import SecNeuronModelLoader
from vllm_guard.log import ROOT as LOG_ROOT
from vllm_guard.runtime.grant_state import STATE as GRANT_STATE
from vllm_guard.secneuron import rekey as lock_mod
from vllm_guard.secneuron.checkpoint import (
    gather_neurons,
    load_checkpoint,
    permute_neurons,
    slice_tensors,
)
from vllm_guard.secneuron.crypto import b64, canonical, chunk_aad, decrypt_chunk_in_place
from vllm_guard.secneuron.files import IntegrityError, RollbackError
from vllm_guard.secneuron.inspect import inspect_checkpoint
from vllm_guard.secneuron.keys import (
    TaskKey,
    generate_signing_key,
    load_signing_key,
    load_task_key,
    save_task_key,
)
from vllm_guard.secneuron.lock import lock_checkpoint
from vllm_guard.secneuron.manifest import (
    MANIFEST_NAME,
    Manifest,
    index_digest,
    read_manifest,
    write_manifest,
)
from vllm_guard.secneuron.open import OpenReport
from vllm_guard.secneuron.options import SecNeuronLoadConfig
from vllm_guard.secneuron.preflight import open_checkpoint, open_data_keys
from vllm_guard.secneuron.rekey import revoke_task, rotate_task_key
from vllm_guard.secneuron.selection import Selection
from vllm_guard.secneuron.unlock import unlock_checkpoint
from vllm_guard.secneuron.weights import stream_weights


@pytest.fixture(scope="module")
def locked(tmp_path_factory, keydir) -> Path:
    """A signed locked checkpoint with add-only, capital-only, shared and public neurons."""
    root = tmp_path_factory.mktemp("ckpt")
    preset = replace(PRESETS["tiny"], train_steps=0)
    plain = build_fixture(root / "plain", preset, seed=3)
    assert (plain / "chat_template.jinja").exists()
    rng = random.Random(1)
    size = preset.intermediate_size
    sel = Selection(TASKS, {layer: {t: sorted(rng.sample(range(size), size // 8)) for t in TASKS}
                            for layer in range(preset.num_hidden_layers)})
    lock_checkpoint(plain, sel, keys_for(keydir, TASKS), root / "locked",
                    load_signing_key(keydir / "publisher.pem"), chunk_bytes=4096, progress=False)
    return root / "locked"


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def tensor_offset(path: Path, name: str, index: int = 0) -> int:
    """Byte offset in the file of element ``index`` of tensor ``name``."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    info = json.loads(raw[8:8 + n])[name]
    return 8 + n + info["data_offsets"][0] + index * 4  # float32 fixture


# --- driving the loader in process ---------------------------------------------------------


class RecordingModel(torch.nn.Module):
    """Stands in for a vLLM model: takes what ``load_weights`` is given."""

    def __init__(self) -> None:
        super().__init__()
        self.got: dict[str, torch.Tensor] = {}

    def load_weights(self, weights):
        for name, t in weights:
            self.got[name] = t.clone()


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_loader(model_dir: Path, keydir: Path, tasks=TASKS, **extra) -> dict[str, torch.Tensor]:
    """``--load-format secneuron`` minus vLLM's model: returns the weights it would load, put
    back in the plaintext neuron order (as unlock writes them). A refusal re-raises the
    loader's error after checking its one ``refusing to load`` line."""
    config = {"keys": [str(keydir / f"{t}.key") for t in tasks],
              "publisher_key": str(keydir / "publisher.pub"), **extra}
    loader = SecNeuronModelLoader(LoadConfig(load_format="secneuron",
                                             model_loader_extra_config=config))
    model, log = RecordingModel(), Lines()
    logging.getLogger(LOG_ROOT).addHandler(log)
    saved = dict(GRANT_STATE.task_bits)
    try:
        loader.load_weights(model, SimpleNamespace(model=str(model_dir)))
    except Exception:
        refusals = [line for line in log.lines if "refusing to load" in line]
        assert len(refusals) == 1 and "\n" not in refusals[0], log.lines
        raise
    finally:
        logging.getLogger(LOG_ROOT).removeHandler(log)
        GRANT_STATE.task_bits = saved
    return plaintext_order(model.got, read_manifest(extra.get("checkpoint", model_dir)))


def plaintext_order(tensors: dict[str, torch.Tensor], manifest: Manifest
                    ) -> dict[str, torch.Tensor]:
    """The served (permuted) FFN tensors with the manifest's permutation undone."""
    out = {n: t.clone() for n, t in tensors.items()}
    for layer, info in manifest.layers.items():
        for name, axis in slice_tensors(info):
            permute_neurons(out[name], axis, manifest.permutation(layer), inverse=True)
    return out


def assert_refused(model_dir: Path, keydir: Path, match: str, exc=ManifestError,
                   **extra) -> None:
    with pytest.raises(exc, match=match) as e:
        run_loader(model_dir, keydir, **extra)
    assert "\n" not in str(e.value)


def unlocked(model_dir: Path, keys: dict[str, TaskKey], out: Path, **kw) -> dict:
    unlock_checkpoint(model_dir, keys, out, **kw)
    return load_file(out / "model.safetensors")


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


# --- flipped bytes in anything the server reads --------------------------------------------


def _public_neuron(manifest: Manifest, layer: int = 0) -> int:
    locked_n = {n for g in manifest.groups for n in g.neurons.get(layer, [])}
    return next(i for i in range(manifest.layers[layer].intermediate_size) if i not in locked_n)


TARGETS = ["embeddings", "public_gate_row", "ciphertext", "config.json", "tokenizer.json",
           "tokenizer_config.json", "generation_config.json", "chat_template.jinja"]


@pytest.mark.parametrize("target", TARGETS)
def test_flipped_byte_in_any_served_file_is_refused(locked, keydir, tmp_path, target):
    bad = copy(locked, tmp_path / "bad")
    manifest = read_manifest(bad)
    weights = bad / "model.safetensors"
    if target == "embeddings":
        name = "model.embed_tokens.weight"
        flip(weights, tensor_offset(weights, name, 5))
    elif target == "public_gate_row":
        gate, row = manifest.layers[0].gate, _public_neuron(manifest)
        hidden = load_file(locked / "model.safetensors")[gate].shape[1]
        flip(weights, tensor_offset(weights, gate, row * hidden))
    elif target == "ciphertext":
        g = manifest.groups[0]
        sl = next(s for s in g.slices if s.axis == 0)
        hidden = sl.shape[1]
        flip(weights, tensor_offset(weights, sl.tensor, g.neurons[sl.layer][0] * hidden))
    else:
        flip(bad / target, (bad / target).stat().st_size // 2)
    fname = "model.safetensors" if target in TARGETS[:3] else target
    assert_refused(bad, keydir, f"file {fname} does not match its signed SHA-256", IntegrityError)
    with pytest.raises(IntegrityError, match=f"file {fname} does not match"):
        unlock_checkpoint(bad, keys_for(keydir, TASKS), tmp_path / "u")
    assert not (tmp_path / "u").exists()
    res = cli("inspect", "--model", bad, "--json")
    files = json.loads(res.stdout)["manifest"]["files"]
    assert files[fname]["status"] == "MISMATCH"
    assert all(f["status"] == "ok" for n, f in files.items() if n != fname)


def test_verified_stream_equals_unverified_stream_and_unlock(locked, keydir, tmp_path):
    verified = run_loader(locked, keydir, tasks=["add", "capital"])
    fast = run_loader(locked, keydir, tasks=["add", "capital"], verify_weights=False)
    ref = unlocked(locked, keys_for(keydir, ["add", "capital"]), tmp_path / "u")
    assert same(verified, fast) and same(verified, ref)


def test_verify_weights_off_still_checks_side_files_and_sizes(locked, keydir, tmp_path):
    """What ``verify_weights: false`` gives up: a flipped public weight byte is served."""
    bad = copy(locked, tmp_path / "bad")
    weights = bad / "model.safetensors"
    flip(weights, tensor_offset(weights, "model.embed_tokens.weight", 5))
    got = run_loader(bad, keydir, verify_weights=False)
    assert not torch.equal(got["model.embed_tokens.weight"],
                           load_file(locked / "model.safetensors")["model.embed_tokens.weight"])
    flip(bad / "config.json", 10)
    assert_refused(bad, keydir, "file config.json does not match", verify_weights=False)
    shutil.copy(locked / "config.json", bad / "config.json")
    with open(weights, "ab") as f:
        f.write(b"\0")
    assert_refused(bad, keydir, "file model.safetensors is .* bytes, the signed manifest says",
                   verify_weights=False)


@pytest.mark.parametrize("change", ["added_shard", "added_file", "added_dir_file", "removed"])
def test_files_added_or_removed_are_refused(locked, keydir, tmp_path, change):
    bad = copy(locked, tmp_path / "bad")
    if change == "added_shard":  # vLLM globs *.safetensors: an extra shard would be loaded
        save_file({"lm_head.weight": torch.zeros(2, 2)}, bad / "extra.safetensors")
        name = "extra.safetensors"
    elif change == "added_file":
        (bad / "special_tokens_map.json").write_text("{}")
        name = "special_tokens_map.json"
    elif change == "added_dir_file":
        (bad / "sub").mkdir()
        (bad / "sub" / "x.json").write_text("{}")
        name = "sub/x.json"
    else:
        (bad / "tokenizer.json").unlink()
        name = "tokenizer.json"
    what = "missing" if change == "removed" else "not covered by the signed manifest"
    assert_refused(bad, keydir, f"file {name} .*{what}", IntegrityError)
    with pytest.raises(IntegrityError, match=f"file {name}"):
        unlock_checkpoint(bad, keys_for(keydir, TASKS), tmp_path / "u")


def test_inspect_shows_version_and_signed_hashes(locked):
    report = inspect_checkpoint(locked)
    m = report["manifest"]
    assert m["version"] == 1 and m["files_intact"] is True
    assert set(m["files"]) == {"model.safetensors", "config.json", "tokenizer.json",
                               "tokenizer_config.json", "generation_config.json",
                               "chat_template.jinja", "vllm_guard_fixture.json"}
    for name, f in m["files"].items():
        assert f["status"] == "ok"
        assert f["sha256"] == f["signed_sha256"] == hashlib.sha256(
            (locked / name).read_bytes()).hexdigest()
    assert "version 1" in report["text"] and "files (signed SHA-256 vs disk): all match" in \
        report["text"]


def test_format_1_manifest_is_refused_clearly(locked, keydir, tmp_path):
    old = copy(locked, tmp_path / "old")
    doc = json.loads((old / MANIFEST_NAME).read_text())
    body = doc["body"]
    ring = body.pop("keyring")
    body.pop("files"), body.pop("format_version")
    body["version"] = 1
    (old / MANIFEST_NAME).write_text(json.dumps({"body": body, "keyring": ring,
                                                 "signature": doc["signature"]}))
    assert_refused(old, keydir, "manifest format 1 .* lock the checkpoint again")


def test_format_4_manifest_is_refused_clearly(locked, keydir, tmp_path):
    """Format 4 signed SHA-256 block digests; it is refused (lock again), even when validly
    signed by the publisher, rather than read as BLAKE3 and failing as 'modified'."""
    old = copy(locked, tmp_path / "old")
    doc = json.loads((old / MANIFEST_NAME).read_text())
    doc["body"]["format_version"] = 4
    key = load_signing_key(keydir / "publisher.pem")
    doc["signature"]["value"] = b64(key.sign(canonical(doc["body"])))
    (old / MANIFEST_NAME).write_text(json.dumps(doc))
    assert_refused(old, keydir, r"^manifest format 4 \(SHA-256 block digests\) is no longer "
                   "accepted: lock the checkpoint again$")
    res = cli("inspect", "--model", old)
    assert res.returncode != 0 and "manifest format 4" in res.stderr
    assert "Traceback" not in res.stderr


# --- splicing older manifests into newer ones ----------------------------------------------


def rotated(locked: Path, keydir: Path, dst: Path) -> tuple[Path, TaskKey]:
    model = copy(locked, dst)
    new = TaskKey.generate("capital")
    rotate_task_key(model, load_task_key(keydir / "capital.key"), new,
                    load_signing_key(keydir / "publisher.pem"))
    return model, new


@pytest.mark.parametrize("how,part", [
    *[("rotate", p) for p in ("keyring", "version", "signature")],  # files/groups unchanged
    *[("revoke", p) for p in ("keyring", "files", "version", "groups", "signature")],
])
def test_splicing_any_part_of_an_older_manifest_is_refused(locked, keydir, tmp_path, how,
                                                           part):
    if how == "rotate":
        model, _ = rotated(locked, keydir, tmp_path / "m")
    else:
        model = copy(locked, tmp_path / "m")
        revoke_task(model, "add", keys_for(keydir, ["capital", "reverse"]),
                    load_signing_key(keydir / "publisher.pem"))
    old = json.loads((locked / MANIFEST_NAME).read_text())
    doc = json.loads((model / MANIFEST_NAME).read_text())
    assert doc["body"]["version"] == 2
    if part == "signature":
        doc["signature"] = old["signature"]
    else:
        doc["body"][part] = old["body"][part]
    assert doc != json.loads((model / MANIFEST_NAME).read_text())
    (model / MANIFEST_NAME).write_text(json.dumps(doc))
    assert_refused(model, keydir, "manifest signature does not verify", SignatureError)
    with pytest.raises(SignatureError):
        unlock_checkpoint(model, keys_for(keydir, ["capital"]), tmp_path / "u")


def test_rotation_rewraps_but_does_not_revoke_and_min_version_stops_rollback(locked, keydir,
                                                                           tmp_path):
    """Plain rotation (lost key) leaves ciphertext and data keys: the whole old manifest is
    still a valid signed checkpoint for the same files. Only ``min_version`` refuses it."""
    model, new = rotated(locked, keydir, tmp_path / "m")
    with pytest.raises(KeyFileError):
        open_data_keys(read_manifest(model), keys_for(keydir, ["capital"]))
    run_loader(model, keydir, tasks=[], min_version=2)
    shutil.copy(locked / MANIFEST_NAME, model / MANIFEST_NAME)  # roll back to version 1
    assert run_loader(model, keydir, tasks=["capital"])  # what min_version is for
    assert_refused(model, keydir, "checkpoint version 1 is older than min_version 2",
                   RollbackError, tasks=["capital"], min_version=2)
    with pytest.raises(RollbackError):
        unlock_checkpoint(model, keys_for(keydir, ["capital"]), tmp_path / "u", min_version=2)
    res = cli("unlock", "--model", model, "--key", keydir / "capital.key", "--min-version", "2",
              "--out", tmp_path / "u")
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
    assert "older than min_version 2" in res.stderr and not (tmp_path / "u").exists()


def test_rotate_refuses_without_signing_key_or_with_another(locked, keydir, tmp_path):
    model = copy(locked, tmp_path / "m")
    save_task_key(TaskKey.generate("capital"), tmp_path / "new.key")
    res = cli("rotate", "--model", model, "--task", "capital", "--old", keydir / "capital.key",
              "--new", tmp_path / "new.key")
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
    assert "--signing-key" in res.stderr
    generate_signing_key(tmp_path / "other.pem")
    with pytest.raises(SignatureError, match="another publisher key"):
        rotate_task_key(model, load_task_key(keydir / "capital.key"),
                        load_task_key(tmp_path / "new.key"),
                        load_signing_key(tmp_path / "other.pem"))
    # an edited manifest is never re-signed (that would launder the edit)
    doc = json.loads((model / MANIFEST_NAME).read_text())
    doc["body"]["groups"][0]["policy"] = TASKS
    (model / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="edited"):
        rotate_task_key(model, load_task_key(keydir / "capital.key"),
                        load_task_key(tmp_path / "new.key"),
                        load_signing_key(keydir / "publisher.pem"))


# --- revocation ----------------------------------------------------------------------------


def revoke_cli(model: Path, keydir: Path, task: str, others, *extra) -> subprocess.CompletedProcess:
    keys = [a for t in others for a in ("--key", keydir / f"{t}.key")]
    return cli("rotate", "--model", model, "--revoke", task, *keys,
               "--signing-key", keydir / "publisher.pem", *extra)


def _old_data_keys(locked: Path, key: TaskKey) -> dict[str, bytes]:
    return open_data_keys(read_manifest(locked), {key.task: key})


def test_revoke_drops_the_task_and_its_key_opens_nothing(locked, keydir, tmp_path):
    model = copy(locked, tmp_path / "m")
    before = {grant: unlocked(locked, keys_for(keydir, grant), tmp_path / f"b{i}")
              for i, grant in enumerate([("capital", "reverse"), ("capital",), ()])}
    res = revoke_cli(model, keydir, "add", ["capital", "reverse"])
    assert res.returncode == 0, res.stderr
    assert "revoked the key of task 'add'" in res.stdout and "version 2" in res.stdout
    manifest = read_manifest(model)
    assert manifest.version == 2 and "add" not in manifest.key_ids
    assert load_task_key(keydir / "add.key").key_id in manifest.revoked
    affected = [g for g in manifest.groups if "add" in g.policy]
    old_manifest = read_manifest(locked)
    # fresh data keys: every affected slice has new nonces and tags, others are untouched
    old_chunks = {(g.id, s.tensor): s.chunks for g in old_manifest.groups for s in g.slices}
    for g in manifest.groups:
        for s in g.slices:
            assert (s.chunks == old_chunks[g.id, s.tensor]) == (g not in affected)
    # the remaining keys give bit-identical weights as before
    for i, (grant, ref) in enumerate(before.items()):
        assert same(unlocked(model, keys_for(keydir, grant), tmp_path / f"a{i}"), ref), grant
        assert same(run_loader(model, keydir, tasks=list(grant)), ref), grant
    # the revoked key opens nothing
    add = load_task_key(keydir / "add.key")
    with pytest.raises(KeyFileError, match="revoked at checkpoint version 2"):
        open_data_keys(manifest, {"add": add})
    assert_refused(model, keydir, "revoked", KeyFileError, tasks=["add"])
    with pytest.raises(KeyFileError, match="revoked"):
        unlocked(model, {"add": add}, tmp_path / "u")
    # ... not even its old data keys against the new ciphertext
    stolen = _old_data_keys(locked, add)
    assert stolen and set(stolen) == {g.id for g in affected}
    ckpt = load_checkpoint(model)
    for g in affected:
        sl = g.slices[0]
        idx = g.neurons[sl.layer]
        _, flat = gather_neurons(ckpt.tensors[sl.tensor], sl.axis,
                                 torch.tensor(idx, dtype=torch.long))
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        binding = sl.binding(manifest.checkpoint_id, g.id, index_digest(idx))
        part = memoryview(flat).cast("B")[:sl.chunks[0].length]
        with pytest.raises(DecryptionError, match="authentication failed"):
            decrypt_chunk_in_place(AESGCM(stolen[g.id]), part, sl.chunks[0],
                                   chunk_aad(binding, 0, len(sl.chunks)), "revoked")


def test_revoked_key_with_old_keyring_spliced_in_opens_nothing(locked, keydir, tmp_path):
    model = copy(locked, tmp_path / "m")
    assert revoke_cli(model, keydir, "add", ["capital", "reverse"]).returncode == 0
    old = json.loads((locked / MANIFEST_NAME).read_text())
    doc = json.loads((model / MANIFEST_NAME).read_text())
    doc["body"]["keyring"] = old["body"]["keyring"]
    (model / MANIFEST_NAME).write_text(json.dumps(doc))
    assert_refused(model, keydir, "signature does not verify", SignatureError, tasks=["add"])
    with pytest.raises(SignatureError):
        unlock_checkpoint(model, keys_for(keydir, ["add"]), tmp_path / "u")
    # even where signatures are not checked, the old wraps only give the old data keys
    doc["signature"] = None
    (model / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(DecryptionError, match="authentication failed"):
        unlock_checkpoint(model, keys_for(keydir, ["add"]), tmp_path / "u", allow_unsigned=True)
    assert_refused(model, keydir, "authentication failed", DecryptionError, tasks=["add"],
                   allow_unsigned=True)
    # and the whole old manifest does not fit the re-encrypted weights
    shutil.copy(locked / MANIFEST_NAME, model / MANIFEST_NAME)
    assert_refused(model, keydir, "file model.safetensors does not match", IntegrityError,
                   tasks=["add"])


def test_revoke_with_new_key_keeps_access_bit_identical(locked, keydir, tmp_path):
    model = copy(locked, tmp_path / "m")
    ref = unlocked(locked, keys_for(keydir, ["add"]), tmp_path / "ref")
    new = TaskKey.generate("add")
    save_task_key(new, tmp_path / "add2.key")
    res = revoke_cli(model, keydir, "add", ["capital", "reverse"], "--old", keydir / "add.key",
                     "--new", tmp_path / "add2.key")
    assert res.returncode == 0, res.stderr
    assert f"now opened by its new key {new.key_id}" in res.stdout
    assert same(unlocked(model, {"add": new}, tmp_path / "u"), ref)
    with pytest.raises(KeyFileError, match="revoked"):
        unlocked(model, keys_for(keydir, ["add"]), tmp_path / "u2")
    # revoke again: versions keep growing
    res = revoke_cli(model, keydir, "capital", ["reverse"], "--key", tmp_path / "add2.key")
    assert res.returncode == 0, res.stderr
    assert read_manifest(model).version == 3
    assert same(unlocked(model, {"add": new}, tmp_path / "u3"), ref)


def test_revoke_says_what_is_missing_in_one_line(locked, keydir, tmp_path):
    model = copy(locked, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    res = revoke_cli(model, keydir, "add", ["capital"])
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
    assert "for tasks ['reverse']: give their current keys" in res.stderr
    res = cli("rotate", "--model", model, "--revoke", "add", "--key", keydir / "capital.key",
              "--key", keydir / "reverse.key")
    assert res.returncode == 1 and "--signing-key" in res.stderr
    save_task_key(TaskKey.generate("add"), tmp_path / "add2.key")
    res = revoke_cli(model, keydir, "add", ["capital", "reverse"], "--new", tmp_path / "add2.key")
    assert res.returncode == 1 and "opened only by 'add': give its current key" in res.stderr
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


@pytest.mark.parametrize("step", ["_reencrypt", "write_manifest", "check_digest"])
def test_interrupted_revoke_leaves_the_old_checkpoint(locked, keydir, tmp_path, monkeypatch,
                                                      step):
    model = copy(locked, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in model.iterdir()}

    def crash(*a, **kw):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(lock_mod, step, crash)
    with pytest.raises(KeyboardInterrupt):
        revoke_task(model, "add", keys_for(keydir, ["capital", "reverse"]),
                    load_signing_key(keydir / "publisher.pem"))
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no partial directory left
    run_loader(model, keydir)


def test_revoke_never_resigns_tampered_weights(locked, keydir, tmp_path):
    model = copy(locked, tmp_path / "m")
    weights = model / "model.safetensors"
    flip(weights, tensor_offset(weights, "model.embed_tokens.weight", 5))
    with pytest.raises(IntegrityError, match="model.safetensors"):
        revoke_task(model, "add", keys_for(keydir, ["capital", "reverse"]),
                    load_signing_key(keydir / "publisher.pem"))
    assert read_manifest(model).version == 1


def test_stream_weights_can_be_driven_without_a_loader(locked, keydir):
    """The loader's two halves as functions (what a custom loader or a test can reuse)."""
    cfg = SecNeuronLoadConfig.from_extra({"publisher_key": str(keydir / "publisher.pub")},
                                         env={})
    manifest = open_checkpoint(locked, cfg)
    stats = OpenReport([], [], [g.id for g in manifest.groups], 0, 0.0, {})
    with ExitStack() as stack:
        names = [n for n, _ in stream_weights(locked, manifest, {}, cfg, stats, stack)]
    assert len(names) == len(load_file(locked / "model.safetensors"))
    assert stats.bytes_verified == manifest.files["model.safetensors"].size


def test_loader_tag_check_remains_behind_the_hash(locked, keydir, tmp_path):
    """A flipped ciphertext byte signed by the publisher itself still fails its AEAD tag."""
    bad = copy(locked, tmp_path / "bad")
    manifest = read_manifest(bad)
    g = manifest.groups[0]
    sl = next(s for s in g.slices if s.axis == 0)
    weights = bad / "model.safetensors"
    flip(weights, tensor_offset(weights, sl.tensor, g.neurons[sl.layer][0] * sl.shape[1]))
    data = weights.read_bytes()
    manifest.files["model.safetensors"] = replace(manifest.files["model.safetensors"],
                                                  sha256=hashlib.sha256(data).hexdigest(),
                                                  blocks=())  # whole-file digest only
    manifest.sign(load_signing_key(keydir / "publisher.pem"))
    write_manifest(manifest, bad)
    assert_refused(bad, keydir, f"tensor {sl.tensor}, group {g.id}, chunk 0: authentication "
                   "failed", DecryptionError)
    run_loader(bad, keydir, tasks=[t for t in TASKS if t not in g.policy])  # not opened: zeroed
