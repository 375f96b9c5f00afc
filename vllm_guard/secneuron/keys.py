"""Task keys (AES-256) and publisher signing keys (Ed25519) on disk."""

from __future__ import annotations

import base64
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from vllm_guard.errors import KeyFileError

TASK_KEY_TYPE = "vllm-guard-task-key"
KEY_BYTES = 32


@dataclass(frozen=True)
class TaskKey:
    task: str
    key_id: str
    key: bytes = field(repr=False)

    def __repr__(self) -> str:  # never show key material
        return f"TaskKey(task={self.task!r}, key_id={self.key_id!r})"

    @classmethod
    def generate(cls, task: str) -> TaskKey:
        if not task or not task.replace("_", "").replace("-", "").isalnum():
            raise KeyFileError(f"invalid task name {task!r}: use letters, digits, '-' or '_'")
        return cls(task=task, key_id=secrets.token_hex(8), key=secrets.token_bytes(KEY_BYTES))

    def to_json(self) -> str:
        return json.dumps({"type": TASK_KEY_TYPE, "task": self.task, "key_id": self.key_id,
                           "key": base64.b64encode(self.key).decode()})


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def save_task_key(key: TaskKey, path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    _write_private(p, key.to_json().encode() + b"\n")
    return p


def load_task_key(path: str | os.PathLike[str]) -> TaskKey:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise KeyFileError(f"cannot read task key file {p}: {e.strerror}") from None
    try:
        doc = json.loads(raw)
        if doc.get("type") != TASK_KEY_TYPE:
            raise ValueError("not a task key")
        task, key_id = str(doc["task"]), str(doc["key_id"])
        key = base64.b64decode(doc["key"], validate=True)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise KeyFileError(f"task key file {p} is truncated or garbled") from None
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"task key file {p} holds {len(key)} key bytes, expected {KEY_BYTES}")
    return TaskKey(task=task, key_id=key_id, key=key)


def load_task_keys(paths: list[str | os.PathLike[str]]) -> dict[str, TaskKey]:
    """Load key files (or every ``*.key`` in a directory), one per task."""
    keys: dict[str, TaskKey] = {}
    for path in paths:
        p = Path(path)
        files = sorted(p.glob("*.key")) if p.is_dir() else [p]
        for f in files:
            k = load_task_key(f)
            if k.task in keys and keys[k.task].key_id != k.key_id:
                raise KeyFileError(f"two different keys given for task {k.task!r} ({f})")
            keys[k.task] = k
    return keys


def generate_signing_key(private_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write an Ed25519 publisher key (PEM, 0600) and its public key beside it (``.pub``)."""
    priv = Ed25519PrivateKey.generate()
    p = Path(private_path)
    _write_private(p, priv.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    pub = p.with_suffix(".pub")
    pub.write_bytes(priv.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    return p, pub


def load_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise KeyFileError(f"cannot load Ed25519 signing key {path}: {type(e).__name__}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"signing key {path} is not an Ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as e:
        raise KeyFileError(f"cannot load publisher public key {path}: {type(e).__name__}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"publisher key {path} is not an Ed25519 public key")
    return key


@dataclass(frozen=True)
class KeyDir:
    """A directory holding ``<task>.key`` per task and the publisher's ``publisher.pem``/``.pub``:
    what the demo, the efficacy suite, benchmarks and tests lock models with."""

    root: Path

    @classmethod
    def create(cls, root: str | os.PathLike[str], tasks: list[str] | tuple[str, ...]) -> KeyDir:
        """Make the keys that are missing (existing ones are kept, so the directory can cache)."""
        d = cls(Path(root))
        for task in tasks:
            if not d.key_file(task).exists():
                save_task_key(TaskKey.generate(task), d.key_file(task))
        if not d.signing_key.exists():
            generate_signing_key(d.signing_key)
        return d

    def key_file(self, task: str) -> Path:
        return self.root / f"{task}.key"

    @property
    def signing_key(self) -> Path:
        return self.root / "publisher.pem"

    @property
    def public_key(self) -> Path:
        return self.root / "publisher.pub"

    def task_keys(self, tasks: list[str] | tuple[str, ...] | None = None) -> dict[str, TaskKey]:
        keys = load_task_keys([self.root])
        return keys if tasks is None else {t: keys[t] for t in tasks}

    def signer(self) -> Ed25519PrivateKey:
        return load_signing_key(self.signing_key)

    def loader_config(self, tasks: list[str] | tuple[str, ...]) -> dict:
        """``--model-loader-extra-config`` that opens ``tasks`` and checks the signature."""
        return {"keys": [str(self.key_file(t)) for t in tasks],
                "publisher_key": str(self.public_key)}
