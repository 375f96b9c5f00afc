"""The secneuron loader's options (``--model-loader-extra-config``) and the ciphertext
detector's thresholds: frozen, strict (unknown keys and wrong types refused), and free of torch
and vLLM so that ``vllm-guard serve`` parses them before it execs vLLM."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from vllm_guard import envs
from vllm_guard.config import from_dict


@dataclass(frozen=True)
class DetectorConfig:
    """Thresholds of the ciphertext detector (:mod:`.detector`); here so that the loader's
    options parse without torch."""

    abs_threshold: float = 64.0
    min_segments: int = 4  # of 6


@dataclass(frozen=True)
class LoaderExtraConfig:
    """``--model-loader-extra-config`` as JSON; strict (unknown keys, wrong types refused)."""

    keys: str | tuple[str, ...] = ()  # key files or directories; one path or a list
    key_dir: str | None = None
    publisher_key: str | None = None
    allow_unsigned: bool = False  # a real JSON boolean: the string "false" is refused
    workers: int | None = None
    verify_weights: bool = True  # hash every weight byte against the signed manifest
    min_version: int = 0  # refuse a signed checkpoint older than this (rollback)
    # the checkpoint whose weights to load when --model is a copy of its side files (set by
    # `vllm-guard serve`, which points vLLM at a private copy of the bytes it checked)
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"'workers' must be at least 1, not {self.workers}")
        paths = [self.keys] if isinstance(self.keys, str) else list(self.keys)
        if "" in paths or "" in (self.key_dir, self.publisher_key, self.checkpoint):
            raise ValueError("'keys', 'key_dir', 'publisher_key' and 'checkpoint' must not be "
                             "empty strings")


@dataclass(frozen=True)
class SecNeuronLoadConfig:
    """Our part of ``--model-loader-extra-config``."""

    keys: tuple[str, ...] = ()
    publisher_key: str | None = None
    allow_unsigned: bool = False
    workers: int | None = None
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    verify_weights: bool = True
    min_version: int = 0
    checkpoint: str | None = None

    WHERE = "secneuron loader option (--model-loader-extra-config)"

    @classmethod
    def from_extra(cls, extra: dict, env: dict[str, str] | None = None) -> SecNeuronLoadConfig:
        """Strict; a bad option is a one-line ``ConfigError`` (a GuardError) naming the key.
        Without ``keys``/``key_dir`` the keys come from ``$VLLM_GUARD_KEYS``, without
        ``publisher_key`` from ``$VLLM_GUARD_PUBLISHER_KEY``."""
        env = os.environ if env is None else env
        x = from_dict(LoaderExtraConfig, extra, cls.WHERE)
        keys = [x.keys] if isinstance(x.keys, str) else list(x.keys)
        if x.key_dir:
            keys.append(x.key_dir)
        if not keys and env.get(envs.KEYS):
            keys = [p for p in env[envs.KEYS].split(os.pathsep) if p]
        return cls(tuple(keys), x.publisher_key or env.get(envs.PUBLISHER_KEY) or None,
                   x.allow_unsigned, x.workers, verify_weights=x.verify_weights,
                   min_version=x.min_version, checkpoint=x.checkpoint)
