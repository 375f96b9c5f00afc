"""The signed manifest beside a locked checkpoint (``guard_manifest.json``).

``body`` (signed, Ed25519): checkpoint id, tasks and their bits, the policy tree (groups with
their neurons), and every encrypted slice with its chunk nonces and tags.
``keyring`` (unsigned): data keys wrapped under task keys. It is not signed so that rotation
needs no publisher key; each wrap is AEAD-bound to (checkpoint, group, task, key id), and the
policy that says which tasks may open a group lives in the signed body.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from vllm_guard.errors import ManifestError, SignatureError
from vllm_guard.secneuron.crypto import Chunk, b64, canonical, unb64

MANIFEST_NAME = "guard_manifest.json"
FORMAT = "vllm-guard-secneuron"
VERSION = 1


@dataclass
class Slice:
    """One group's neurons in one tensor: rows (axis 0) of gate/up, columns (axis 1) of down."""

    tensor: str
    file: str
    layer: int
    axis: int
    dtype: str
    shape: list[int]
    chunks: list[Chunk]

    def binding(self, checkpoint_id: str, group: str, index_digest: str) -> dict:
        return {"ckpt": checkpoint_id, "tensor": self.tensor, "dtype": self.dtype,
                "shape": self.shape, "axis": self.axis, "group": group, "idx": index_digest}

    def to_json(self) -> dict:
        return {"tensor": self.tensor, "file": self.file, "layer": self.layer, "axis": self.axis,
                "dtype": self.dtype, "shape": self.shape,
                "chunks": [c.to_json() for c in self.chunks]}

    @classmethod
    def from_json(cls, d: dict) -> Slice:
        return cls(d["tensor"], d["file"], int(d["layer"]), int(d["axis"]), d["dtype"],
                   [int(x) for x in d["shape"]], [Chunk.from_json(c) for c in d["chunks"]])


@dataclass
class Group:
    """A node of the policy tree: neurons selected by exactly the tasks in ``policy`` (OR)."""

    id: str
    policy: list[str]
    neurons: dict[int, list[int]]  # layer -> sorted neuron indices
    slices: list[Slice] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"id": self.id, "policy": self.policy,
                "neurons": {str(k): v for k, v in sorted(self.neurons.items())},
                "slices": [s.to_json() for s in self.slices]}

    @classmethod
    def from_json(cls, d: dict) -> Group:
        return cls(d["id"], list(d["policy"]),
                   {int(k): [int(i) for i in v] for k, v in d["neurons"].items()},
                   [Slice.from_json(s) for s in d["slices"]])


@dataclass
class LayerInfo:
    gate: str
    up: str
    down: str
    intermediate_size: int


@dataclass
class Manifest:
    checkpoint_id: str
    tasks: dict[str, int]  # task -> bit
    layers: dict[int, LayerInfo]
    groups: list[Group]
    key_ids: dict[str, str] = field(default_factory=dict)  # task -> key id (keyring)
    wraps: dict[str, dict[str, dict]] = field(default_factory=dict)  # group -> task -> wrap
    signature: dict | None = None

    def body(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "checkpoint_id": self.checkpoint_id,
            "tasks": {t: {"bit": b} for t, b in sorted(self.tasks.items())},
            "layers": {str(i): vars(info) for i, info in sorted(self.layers.items())},
            "groups": [g.to_json() for g in self.groups],
        }

    def to_json(self) -> dict:
        return {"body": self.body(),
                "keyring": {"key_ids": self.key_ids, "wraps": self.wraps},
                "signature": self.signature}

    @classmethod
    def from_json(cls, doc: dict) -> Manifest:
        try:
            body = doc["body"]
            if body.get("format") != FORMAT or body.get("version") != VERSION:
                raise ManifestError(f"unsupported manifest format {body.get('format')!r} "
                                    f"version {body.get('version')!r}")
            return cls(
                checkpoint_id=body["checkpoint_id"],
                tasks={t: int(v["bit"]) for t, v in body["tasks"].items()},
                layers={int(k): LayerInfo(**v) for k, v in body["layers"].items()},
                groups=[Group.from_json(g) for g in body["groups"]],
                key_ids=dict(doc["keyring"]["key_ids"]),
                wraps=doc["keyring"]["wraps"],
                signature=doc.get("signature"),
            )
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ManifestError(f"malformed manifest: {type(e).__name__}: {e}") from None

    # --- signing ---

    def sign(self, key: Ed25519PrivateKey) -> None:
        pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.signature = {"alg": "ed25519", "public_key": b64(pub),
                          "value": b64(key.sign(canonical(self.body())))}

    def signature_status(self, trusted: Ed25519PublicKey | None = None) -> str:
        """'unsigned', 'invalid', 'valid (embedded key)', 'valid (trusted key)', 'untrusted key'."""
        if not self.signature:
            return "unsigned"
        try:
            embedded = Ed25519PublicKey.from_public_bytes(unb64(self.signature["public_key"]))
            embedded.verify(unb64(self.signature["value"]), canonical(self.body()))
        except (InvalidSignature, ValueError, KeyError, TypeError):
            return "invalid"
        if trusted is None:
            return "valid (embedded key)"
        same = trusted.public_bytes(Encoding.Raw, PublicFormat.Raw) == unb64(
            self.signature["public_key"])
        return "valid (trusted key)" if same else "untrusted key"

    def verify(self, trusted: Ed25519PublicKey | None, allow_unsigned: bool = False) -> None:
        """Raise SignatureError unless signed by ``trusted`` (or unsigned and allowed)."""
        status = self.signature_status(trusted)
        if status == "valid (trusted key)" or (allow_unsigned and status != "invalid"):
            return
        if status == "valid (embedded key)":
            raise SignatureError("manifest signature cannot be checked: no publisher public key "
                                 "configured (set publisher_key, or allow_unsigned)")
        raise SignatureError({
            "unsigned": "manifest is unsigned (refused unless allow_unsigned is set)",
            "invalid": "manifest signature does not verify: the manifest was edited",
            "untrusted key": "manifest is signed by a key other than the configured publisher",
        }[status])

    def task_bits(self, tasks: list[str]) -> int:
        return sum(1 << self.tasks[t] for t in tasks)


def manifest_path(model_dir: str | os.PathLike[str]) -> Path:
    return Path(model_dir) / MANIFEST_NAME


def read_manifest(model_dir: str | os.PathLike[str]) -> Manifest | None:
    """The checkpoint's manifest, or None if it has none."""
    p = manifest_path(model_dir)
    if not p.exists():
        return None
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ManifestError(f"cannot read {p}: {e}") from None
    return Manifest.from_json(doc)


def write_manifest(manifest: Manifest, model_dir: str | os.PathLike[str]) -> Path:
    p = manifest_path(model_dir)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=None, separators=(",", ":")))
    os.replace(tmp, p)
    return p
