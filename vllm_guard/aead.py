"""The one AEAD storage format: ``nonce (12 random bytes) || ciphertext || tag (16)``.

AES-256-GCM from ``cryptography``. Small sealed values (wrapped data keys in a manifest,
vault values in Redis) all use it; bulk weight chunks keep nonce and tag in the manifest
beside ciphertext that stays in place (``secneuron.crypto``), with the same primitive.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
TAG_BYTES = 16


def seal(aead: AESGCM, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + aead.encrypt(nonce, plaintext, aad)


def unseal(aead: AESGCM, sealed: bytes, aad: bytes) -> bytes:
    """Raises ``cryptography.exceptions.InvalidTag`` on any tampering (or a short blob)."""
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        from cryptography.exceptions import InvalidTag

        raise InvalidTag
    return aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
