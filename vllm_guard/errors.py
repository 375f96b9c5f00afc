"""Exceptions raised by vllm-guard. Messages name what failed, never key bytes or raw values."""


class GuardError(Exception):
    """Base class for every error vllm-guard raises on bad input."""


class OutputExistsError(GuardError):
    """An output directory already holds something (refusing to overwrite it)."""


class KeyFileError(GuardError):
    """A key file is missing, unreadable, truncated or for the wrong task/checkpoint."""


class ManifestError(GuardError):
    """The manifest is missing, malformed or does not match the checkpoint."""


class SignatureError(ManifestError):
    """The manifest signature is absent or does not verify."""


class DecryptionError(GuardError):
    """A ciphertext chunk or wrapped data key failed authentication."""


class EncryptedWeightsError(GuardError):
    """The distribution detector found neurons that still look like ciphertext."""
