"""The signed manifest beside a locked checkpoint (``guard_manifest.json``).

``body`` is signed (Ed25519) as a whole: checkpoint id and version, tasks and their bits, the
policy tree (groups with their neurons), every encrypted slice with its chunk nonces and tags,
the SHA-256 and size of every other file in the directory (weights, config, tokenizer, ...)
with the BLAKE3 of each block of the weight files (what the loader checks), and the key
ring (data keys wrapped under task keys). Nothing the server reads and nothing that decides
who opens what is outside the signature, so no part of an older manifest can be spliced into
a newer one. ``version`` starts at 1 and grows with every re-signing (rotate, revoke):
loaders refuse versions below their ``min_version`` (rollback).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from vllm_guard.atomic import fsync_dir
from vllm_guard.errors import ManifestError, SignatureError
from vllm_guard.secneuron.crypto import Chunk, b64, canonical, unb64

MANIFEST_NAME = "guard_manifest.json"
MANIFEST_TMP = "guard_manifest.tmp"  # write_manifest's staging file
FORMAT = "vllm-guard-secneuron"
FORMAT_VERSION = 6  # 1: unsigned key ring, no file hashes; 2: key wraps as nonce + ct;
# 3: down_proj ciphertext neuron-major; 4: down_proj [H, k], per-block file digests (SHA-256);
# 5: block digests are BLAKE3 (hashing no longer costs more than vLLM's own load);
# 6: FFN neurons permuted so each group is one contiguous block (decrypted where it lies)
# Older formats whose layout matches ours but whose digests are read otherwise: refused with
# the reason, not reinterpreted (a v4 block digest checked as BLAKE3 would only "mismatch").
_RETIRED = {4: "manifest format 4 (SHA-256 block digests) is no longer accepted: lock the "
               "checkpoint again",
            5: "manifest format 5 (groups' neurons scattered, not one block each) is no longer "
               "accepted: lock the checkpoint again"}


def _is_sha256(text: str) -> bool:  # or a BLAKE3: 32 bytes in hex too
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


@dataclass(frozen=True)
class FileDigest:
    """SHA-256 (hex) and size of one file of the checkpoint, as signed, and the BLAKE3 of
    each ``block_bytes`` block: blocks are checked in parallel, each before its bytes are
    used (a whole-file hash runs on one core and only says yes at the end). Without
    blocks (hand-made digests) the whole file is one block, checked by its SHA-256."""

    sha256: str
    size: int
    block_bytes: int = 0
    blocks: tuple[str, ...] = ()

    def to_json(self) -> dict:
        doc: dict = {"sha256": self.sha256, "size": self.size}
        if self.blocks:
            doc.update(block_bytes=self.block_bytes, blocks=list(self.blocks))
        return doc

    @classmethod
    def from_json(cls, d: dict) -> FileDigest:
        sha, size = str(d["sha256"]), int(d["size"])
        block_bytes, blocks = int(d.get("block_bytes", 0)), tuple(map(str, d.get("blocks", ())))
        if not _is_sha256(sha) or size < 0 or not all(map(_is_sha256, blocks)) or (
                blocks and (block_bytes <= 0 or len(blocks) != -(-size // block_bytes))):
            raise ValueError(f"bad file digest {d!r}")
        return cls(sha, size, block_bytes, blocks)


def index_digest(indices: list[int]) -> str:
    """Digest of a group's neuron indices in one layer: bound into each slice's AAD."""
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:32]


def wrap_binding(checkpoint_id: str, group: str, task: str, key_id: str) -> dict:
    """What a group's data key, wrapped under one task key, is bound to (its AAD)."""
    return {"ckpt": checkpoint_id, "group": group, "task": task, "key_id": key_id}


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


_ATTN = re.compile(r"^.*\.layers\.\d+\.self_attn\.(?P<proj>[qkvo])_proj\.weight$")


def is_attention(tensor: str) -> bool:
    """An attention projection (a sealed capability's heads), not an FFN weight."""
    return _ATTN.match(tensor) is not None


def is_kv(tensor: str) -> bool:
    """k_proj or v_proj: their rows are KV heads (fewer than the query heads under
    grouped-query attention), indexed by a group's ``kv`` block."""
    m = _ATTN.match(tensor)
    return m is not None and m["proj"] in ("k", "v")


@dataclass
class Group:
    """A node of the policy tree: neurons selected by exactly the tasks in ``policy`` (OR),
    and, for sealed capabilities, attention columns (q/k/v output rows = o_proj input
    columns of the heads they own).

    ``neurons`` index the locked checkpoint (and the served model, its neuron bit tables):
    in a locked manifest each layer's are one block of consecutive positions. ``selected``
    are the same neurons' indices in the plaintext model, in the same order: position
    ``neurons[l][i]`` holds plaintext neuron ``selected[l][i]`` (the signed permutation,
    :meth:`Manifest.permutation`). A selection's policy tree has no ``selected`` yet.
    ``attn`` columns are not permuted: a group's must already be one block per layer
    (a sealed capability's heads are added side by side, see ``secneuron/capability.py``).
    ``kv``: the k/v_proj rows of the KV heads those heads read (grouped-query attention:
    ``g`` query heads share one KV head); a layer it does not name uses the ``attn``
    columns (one KV head per head), so manifests without ``kv`` mean what they always did."""

    id: str
    policy: list[str]
    neurons: dict[int, list[int]]  # layer -> sorted neuron indices (positions when locked)
    slices: list[Slice] = field(default_factory=list)
    selected: dict[int, list[int]] = field(default_factory=dict)  # layer -> plaintext indices
    attn: dict[int, list[int]] = field(default_factory=dict)  # layer -> sorted head columns
    kv: dict[int, list[int]] = field(default_factory=dict)  # layer -> sorted k/v rows (GQA)

    def kv_rows(self, layer: int) -> list[int]:
        """The k/v_proj rows this group owns in ``layer`` (its attention columns without
        a ``kv`` block)."""
        return self.kv[layer] if layer in self.kv else self.attn.get(layer, [])

    def block(self, layer: int) -> tuple[int, int]:
        """(first position, count) of the group's neurons in ``layer`` of the locked model."""
        idx = self.neurons[layer]
        return (idx[0] if idx else 0), len(idx)

    def indices(self, sl: Slice) -> list[int]:
        """The rows/columns of ``sl``'s tensor that this group owns (bound into its AAD
        with the tensor's name, so FFN and attention indices cannot be swapped)."""
        if is_kv(sl.tensor):
            return self.kv_rows(sl.layer)
        return (self.attn if is_attention(sl.tensor) else self.neurons).get(sl.layer, [])

    def span(self, sl: Slice) -> tuple[int, int]:
        """(first, count) of ``sl``'s rows/columns this group owns: one block in a locked
        manifest (:meth:`Manifest.check_layout`), decrypted and zeroed where it lies."""
        idx = self.indices(sl)
        return (idx[0] if idx else 0), len(idx)

    def to_json(self) -> dict:
        doc = {"id": self.id, "policy": self.policy,
               "neurons": {str(k): v for k, v in sorted(self.neurons.items())},
               "selected": {str(k): v for k, v in sorted(self.selected.items())},
               "slices": [s.to_json() for s in self.slices]}
        if self.attn:  # only sealed capabilities: other manifests carry no "attn" key
            doc["attn"] = {str(k): v for k, v in sorted(self.attn.items())}
        if self.kv:  # only grouped-query attention
            doc["kv"] = {str(k): v for k, v in sorted(self.kv.items())}
        return doc

    @classmethod
    def from_json(cls, d: dict) -> Group:
        return cls(d["id"], list(d["policy"]),
                   {int(k): [int(i) for i in v] for k, v in d["neurons"].items()},
                   [Slice.from_json(s) for s in d["slices"]],
                   {int(k): [int(i) for i in v] for k, v in d["selected"].items()},
                   {int(k): [int(i) for i in v] for k, v in d.get("attn", {}).items()},
                   {int(k): [int(i) for i in v] for k, v in d.get("kv", {}).items()})


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
    version: int = 1  # +1 per re-signing (rotate, revoke); loaders refuse < min_version
    files: dict[str, FileDigest] = field(default_factory=dict)  # every file but the manifest
    revoked: dict[str, dict] = field(default_factory=dict)  # key id -> {"task", "version"}

    def body(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "checkpoint_id": self.checkpoint_id, "version": self.version,
            "tasks": {t: {"bit": b} for t, b in sorted(self.tasks.items())},
            "layers": {str(i): vars(info) for i, info in sorted(self.layers.items())},
            "groups": [g.to_json() for g in self.groups],
            "files": {n: d.to_json() for n, d in sorted(self.files.items())},
            "keyring": {"key_ids": dict(sorted(self.key_ids.items())), "wraps": self.wraps,
                        "revoked": self.revoked},
        }

    def to_json(self) -> dict:
        return {"body": self.body(), "signature": self.signature}

    @classmethod
    def from_json(cls, doc: dict) -> Manifest:
        try:
            body = doc["body"]
            if body.get("format") != FORMAT:
                raise ManifestError(f"unsupported manifest format {body.get('format')!r}")
            if "format_version" not in body:
                raise ManifestError("manifest format 1 (key ring and files not signed) is no "
                                    "longer accepted: lock the checkpoint again")
            if body["format_version"] in _RETIRED:
                raise ManifestError(_RETIRED[body["format_version"]])
            if body["format_version"] != FORMAT_VERSION:
                raise ManifestError(f"unsupported manifest format version "
                                    f"{body['format_version']!r} (this vllm-guard reads "
                                    f"{FORMAT_VERSION}): lock the checkpoint again")
            version = body["version"]
            if type(version) is not int or version < 1:
                raise ValueError(f"checkpoint version must be an integer >= 1, not {version!r}")
            ring = body["keyring"]
            manifest = cls(
                checkpoint_id=body["checkpoint_id"],
                tasks={t: int(v["bit"]) for t, v in body["tasks"].items()},
                layers={int(k): LayerInfo(**v) for k, v in body["layers"].items()},
                groups=[Group.from_json(g) for g in body["groups"]],
                key_ids=dict(ring["key_ids"]),
                wraps=ring["wraps"],
                signature=doc.get("signature"),
                version=version,
                files={str(n): FileDigest.from_json(d) for n, d in body["files"].items()},
                revoked=dict(ring.get("revoked", {})),
            )
            manifest.check_layout()
            return manifest
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

    # --- the neuron layout (format 6) ---

    def check_layout(self) -> None:
        """Every group's neurons are one block of consecutive positions per layer, blocks
        do not overlap, and ``selected`` names as many distinct plaintext neurons."""
        for layer, info in self.layers.items():
            size = info.intermediate_size
            placed = np.zeros(size, dtype=bool)
            chosen = np.zeros(size, dtype=bool)
            for g in self.groups:
                pos, sel = g.neurons.get(layer, []), g.selected.get(layer, [])
                if not pos and not sel:
                    continue
                start, count = g.block(layer)
                if (pos != list(range(start, start + count)) or start < 0
                        or start + count > size or len(sel) != count
                        or min(sel) < 0 or max(sel) >= size):
                    raise ManifestError(f"group {g.id}, layer {layer}: neurons are not one "
                                        f"block within [0, {size}) matching its selection")
                if placed[start:start + count].any() or chosen[sel].any():
                    raise ManifestError(f"group {g.id}, layer {layer}: neurons overlap "
                                        "another group's")
                placed[start:start + count] = True
                chosen[sel] = True
                if int(chosen.sum()) != int(placed.sum()):
                    raise ManifestError(f"group {g.id}, layer {layer}: a plaintext neuron "
                                        "is selected twice")
        for g in self.groups:
            if set(g.selected) != set(g.neurons) or not set(g.neurons) <= set(self.layers):
                raise ManifestError(f"group {g.id}: neurons and selection name other layers")
        self.check_attention()

    def check_attention(self, rows: dict[int, tuple[int, int]] | None = None) -> None:
        """Sealed heads: each group's attention columns and k/v rows one block per layer
        (decrypted where they lie, like the neurons), inside every tensor sealed with them,
        no two groups sharing a column or row; each slice covers indices its group owns.
        Grouped-query attention: with ``g`` query heads per KV head (q_proj rows / k_proj
        rows), a group's query heads read exactly its KV heads (columns ``[a, a + n)``,
        rows ``[b, b + m)``: ``a == g * b`` and ``n == g * m``), so no public head reads a
        sealed KV head and zeroing them leaves the public model. ``rows``: layer -> (q_proj
        rows, k_proj rows) when no slices say it yet (before encryption)."""
        rows = dict(rows or {})
        for g in self.groups:
            for sl in g.slices:
                if is_attention(sl.tensor) and sl.tensor.endswith(("q_proj.weight",
                                                                   "k_proj.weight")):
                    q, k = rows.get(sl.layer, (0, 0))
                    rows[sl.layer] = (sl.shape[0], k) if sl.tensor.endswith(
                        "q_proj.weight") else (q, sl.shape[0])
        taken: dict[tuple[str, int], list[tuple[int, int, str]]] = {}
        for g in self.groups:
            if not set(g.attn) <= set(self.layers):
                raise ManifestError(f"group {g.id}: attention columns name other layers")
            if not set(g.kv) <= {layer for layer, cols in g.attn.items() if cols}:
                raise ManifestError(f"group {g.id}: k/v rows name layers where it owns no "
                                    "attention columns")
            for what, blocks in (("attention columns", g.attn), ("k/v rows", g.kv)):
                for layer, cols in blocks.items():
                    start = cols[0] if cols else 0
                    if cols != list(range(start, start + len(cols))) or start < 0:
                        raise ManifestError(f"group {g.id}, layer {layer}: {what} are not one "
                                            "block (sealed heads must be adjacent)")
                    for a, b, other in taken.get((what, layer), []):
                        if a < start + len(cols) and start < b:
                            raise ManifestError(f"group {g.id}, layer {layer}: {what} "
                                                f"overlap group {other}'s")
                    taken.setdefault((what, layer), []).append(
                        (start, start + len(cols), g.id))
            for layer, cols in g.attn.items():
                q, k = rows.get(layer, (0, 0))
                if not cols or not q or not k:
                    continue
                kv = g.kv_rows(layer)
                per = q // k if q % k == 0 else 0
                if not per or cols[0] != per * (kv[0] if kv else -1) \
                        or len(cols) != per * len(kv):
                    raise ManifestError(
                        f"group {g.id}, layer {layer}: its k/v rows are not the KV heads its "
                        f"query heads read ({q // max(k, 1)} query heads per KV head: columns "
                        f"[{cols[0]}, {cols[-1] + 1}) need rows [{cols[0] // max(per, 1)}, "
                        f"{(cols[-1] + 1) // max(per, 1)}))")
            for sl in g.slices:
                start, count = g.span(sl)
                if not count or sl.axis not in (0, 1) or len(sl.shape) != 2 \
                        or start + count > sl.shape[sl.axis]:
                    raise ManifestError(f"group {g.id}: slice of {sl.tensor} covers no block "
                                        f"the group owns within its shape {sl.shape}")

    def permutation(self, layer: int) -> np.ndarray:
        """int64 ``perm``: position ``p`` of the locked layer holds plaintext neuron
        ``perm[p]``. Groups' neurons are where ``neurons``/``selected`` say; a public neuron
        keeps its index unless a group's block covers it, and those displaced fill the places
        the groups' neurons left, both in ascending order (:func:`plan_blocks`)."""
        return layer_permutation(self.layers[layer].intermediate_size,
                                 [(g.neurons[layer], g.selected[layer]) for g in self.groups
                                  if g.neurons.get(layer)])


def layer_permutation(size: int, blocks: list[tuple[list[int], list[int]]]) -> np.ndarray:
    """See :meth:`Manifest.permutation`; ``blocks`` are (positions, plaintext neurons)."""
    perm = np.arange(size, dtype=np.int64)
    in_block = np.zeros(size, dtype=bool)
    locked = np.zeros(size, dtype=bool)
    for pos, sel in blocks:
        in_block[pos] = True
        locked[sel] = True
    freed = np.flatnonzero(~in_block & locked)
    displaced = np.flatnonzero(in_block & ~locked)
    perm[freed] = displaced
    for pos, sel in blocks:
        perm[pos] = sel
    return perm


def plan_blocks(size: int, groups: list[list[int]]) -> list[int]:
    """Start position of each group's block (its neurons are ``groups[i]``, sorted): at its
    first neuron when free, else right after the block before (in first-neuron order), pulled
    back from the end if they overflow. Groups already contiguous stay where they are."""
    order = sorted((i for i in range(len(groups)) if groups[i]), key=lambda i: groups[i][0])
    starts = [0] * len(groups)
    end = 0
    for i in order:
        starts[i] = max(groups[i][0], end)
        end = starts[i] + len(groups[i])
    limit = size
    for i in reversed(order):
        starts[i] = min(starts[i], limit - len(groups[i]))
        limit = starts[i]
    return starts


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


def read_locked_manifest(model_dir: str | os.PathLike[str]) -> Manifest:
    """The manifest of a locked checkpoint; ManifestError if the directory has none."""
    manifest = read_manifest(model_dir)
    if manifest is None:
        raise ManifestError(f"{model_dir} has no guard_manifest.json: not a locked checkpoint")
    return manifest


def write_manifest(manifest: Manifest, model_dir: str | os.PathLike[str]) -> Path:
    """Replace the manifest atomically: a crash leaves the old one or the new one, whole."""
    p = manifest_path(model_dir)
    tmp = p.with_name(MANIFEST_TMP)
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest.to_json(), indent=None, separators=(",", ":")))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    fsync_dir(p.parent)
    return p
