"""Reading vLLM's argv the way vLLM's parser will, for ``vllm-guard serve`` and its preflight.

Serve decides which checks run from ``--model`` and ``--load-format``; were it to read a flag
differently from vLLM (first value vs last, ``--load_format`` vs ``--load-format``, an
abbreviation), a locked checkpoint could reach vLLM's default loader unchecked. One reader,
used everywhere, and the flags that pick the checks may appear once only, spelled in full.
"""

from __future__ import annotations

from collections.abc import Sequence

from vllm_guard.errors import GuardError

MODEL_FLAG = "--model"
LOAD_FORMAT_FLAG = "--load-format"
LOAD_CONFIG_FLAG = "--model-loader-extra-config"
GUARDED_FLAGS = (MODEL_FLAG, LOAD_FORMAT_FLAG, LOAD_CONFIG_FLAG)
# where else vLLM reads a model's files: for a locked checkpoint, serve points them at the
# checked copy (vllm_guard.cli.staging)
MODEL_FILE_FLAGS = ("--tokenizer", "--hf-config-path", "--generation-config")


class AmbiguousArgs(GuardError):
    """A guarded flag given twice or abbreviated: exit status 2, as argparse's usage errors."""

    exit_code = 2


def flag_name(token: str) -> str | None:
    """``token``'s option name as vLLM's FlexibleArgumentParser sees it (``_`` -> ``-`` before
    any ``.``, ``=value`` dropped), or None for a value or a positional argument."""
    if not token.startswith("--"):
        return None
    name = token.split("=", 1)[0]
    head, dot, rest = name[2:].partition(".")
    return "--" + head.replace("_", "-") + dot + rest


def flag_values(args: Sequence[str], flag: str) -> list[str]:
    """Every value given for ``flag`` (``--flag V`` or ``--flag=V``, any ``_``/``-`` spelling),
    in order."""
    values = []
    for i, token in enumerate(args):
        if flag_name(token) != flag:
            continue
        if "=" in token:
            values.append(token.split("=", 1)[1])
        elif i + 1 < len(args):
            values.append(args[i + 1])
    return values


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value vLLM will use for ``flag``: the last one given (argparse), or None."""
    values = flag_values(args, flag)
    return values[-1] if values else None


def check_unambiguous(args: Sequence[str], flags: Sequence[str] = GUARDED_FLAGS) -> None:
    """Refuse one of ``flags`` given twice or abbreviated (argparse accepts ``--load-form``)."""
    for token in args:
        name = flag_name(token)
        if name is None or len(name) <= 2 or name in flags:  # "--": end of options
            continue
        if any(full.startswith(name) for full in flags):
            raise AmbiguousArgs(f"{token.split('=', 1)[0]}: spell out the option in full "
                                f"({' / '.join(f for f in flags if f.startswith(name))})")
    for flag in flags:
        if len(flag_values(args, flag)) > 1:
            raise AmbiguousArgs(f"{flag} is given more than once: ambiguous, give it once")


def with_flag(args: Sequence[str], flag: str, value: str) -> list[str]:
    """``args`` with every value of ``flag`` (any spelling) set to ``value``."""
    out = list(args)
    for i, token in enumerate(out):
        if flag_name(token) == flag:
            if "=" in token:
                out[i] = f"{flag}={value}"
            elif i + 1 < len(out):
                out[i + 1] = value
    return out
