"""All AEAD use of the SecNeuron scheme: chunk encryption in place and data-key wrapping.

AES-256-GCM from ``cryptography``; every nonce is 12 fresh random bytes from ``os.urandom``.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vllm_guard.errors import DecryptionError

NONCE_BYTES = 12
TAG_BYTES = 16
DEFAULT_CHUNK_BYTES = 1 << 20


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Chunk:
    nonce: bytes
    tag: bytes
    length: int

    def to_json(self) -> list:
        return [b64(self.nonce), b64(self.tag), self.length]

    @classmethod
    def from_json(cls, item: list) -> Chunk:
        return cls(unb64(item[0]), unb64(item[1]), int(item[2]))


def chunk_aad(binding: dict, index: int, count: int) -> bytes:
    """AAD of one chunk: its slice binding (checkpoint, tensor, dtype, shape, group) + index."""
    return canonical({**binding, "chunk": index, "chunks": count})


def encrypt_in_place(key: bytes, buf: np.ndarray, binding: dict, chunk_bytes: int) -> list[Chunk]:
    """Encrypt the flat uint8 array ``buf`` in place, chunk by chunk; return nonces and tags."""
    aead = AESGCM(key)
    view = memoryview(buf).cast("B")
    count = max(1, -(-len(view) // chunk_bytes))
    chunks = []
    for i in range(count):
        part = view[i * chunk_bytes:(i + 1) * chunk_bytes]
        nonce = os.urandom(NONCE_BYTES)
        sealed = aead.encrypt(nonce, part, chunk_aad(binding, i, count))
        part[:] = sealed[:-TAG_BYTES]
        chunks.append(Chunk(nonce, sealed[-TAG_BYTES:], len(part)))
    return chunks


_scratch = threading.local()


def decrypt_chunk_in_place(
    aead: AESGCM, part: memoryview, chunk: Chunk, aad: bytes, what: str
) -> None:
    """Authenticate and decrypt one chunk into its own memory. ``what`` names it in errors."""
    if len(part) != chunk.length:
        raise DecryptionError(f"{what}: chunk length {len(part)} != manifest {chunk.length}")
    need = chunk.length + TAG_BYTES
    buf = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < need:
        buf = _scratch.buf = bytearray(max(need, DEFAULT_CHUNK_BYTES + TAG_BYTES))
    sealed = memoryview(buf)[:need]
    sealed[:chunk.length] = part
    sealed[chunk.length:] = chunk.tag
    try:
        # decrypt_into avoids a fresh allocation per chunk (5-10x faster than decrypt()).
        aead.decrypt_into(chunk.nonce, sealed, aad, part)
    except InvalidTag:
        raise DecryptionError(f"{what}: authentication failed (tampered ciphertext, "
                              "reordered chunk or edited manifest)") from None


def wrap_data_key(task_key: bytes, data_key: bytes, binding: dict) -> dict:
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(task_key).encrypt(nonce, data_key, canonical(binding))
    return {"nonce": b64(nonce), "ct": b64(sealed)}


def unwrap_data_key(task_key: bytes, wrapped: dict, binding: dict) -> bytes:
    """Raises InvalidTag (caught by the caller, who knows which task and group failed)."""
    return AESGCM(task_key).decrypt(unb64(wrapped["nonce"]), unb64(wrapped["ct"]),
                                    canonical(binding))


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)
