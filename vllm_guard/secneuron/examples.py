"""Prompt/answer examples: JSONL calibration/training files and their tokenization."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from vllm_guard.errors import GuardError

Example = dict[str, str]  # {"prompt": ..., "answer": ...}


def read_calibration(path: str | os.PathLike[str]) -> list[Example]:
    """JSONL with ``prompt`` (+ optional ``answer``) or ``text`` per line."""
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise GuardError(f"cannot read calibration file {path}: {e.strerror}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            prompt = doc.get("prompt", doc.get("text"))
            if not isinstance(prompt, str):
                raise ValueError
        except (ValueError, AttributeError):
            raise GuardError(f"{path}:{i}: expected a JSON object with 'prompt' or 'text'"
                             ) from None
        rows.append({"prompt": prompt, "answer": doc.get("answer") or ""})
    if not rows:
        raise GuardError(f"calibration file {path} has no examples")
    return rows


def encode_example(tokenizer, ex: Example) -> tuple[list[int], list[int]]:
    """Prompt ids and answer ids as the server sees them.

    With a chat template and an answer, the prompt is one user turn plus the generation
    prompt (the chat endpoint); otherwise it is the raw prompt with the tokenizer's special
    tokens (the completions endpoint).
    """
    answer = ex.get("answer") or ""
    if tokenizer.chat_template and answer:
        text = tokenizer.apply_chat_template([{"role": "user", "content": ex["prompt"]}],
                                             tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        p_ids = tokenizer(ex["prompt"])["input_ids"]
    a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] if answer else []
    return p_ids, a_ids


class AnswerBatcher:
    """Prompt + answer (+ EOS) token batches with labels on the answer only.

    Token ids as :func:`encode_example` gives them (as the server tokenizes).
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        self.eos = tokenizer.eos_token_id
        self._cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    def ids(self, ex: Example) -> tuple[list[int], list[int]]:
        key = (ex["prompt"], ex["answer"])
        if key not in self._cache:
            self._cache[key] = encode_example(self.tokenizer, ex)
        return self._cache[key]

    def _fill(self, batch: list[Example]) -> None:
        """Encode the batch's new examples in one tokenizer call per side: one call per
        example cost ~20% of a small model's training step. Chat-template prompts go one by
        one, as :func:`encode_example` renders them."""
        if self.tokenizer.chat_template:
            for ex in batch:
                self.ids(ex)
            return
        new = list({(ex["prompt"], ex["answer"]) for ex in batch} - self._cache.keys())
        if not new:
            return
        prompts = self.tokenizer([p for p, _ in new])["input_ids"]
        answers = self.tokenizer([a for _, a in new], add_special_tokens=False)["input_ids"]
        for (p, a), p_ids, a_ids in zip(new, prompts, answers, strict=True):
            self._cache[(p, a)] = (p_ids, a_ids)

    def encode(self, batch: list[Example], eos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` [B, L] and ``labels`` [B, L] (-100 outside the answer)."""
        self._fill(batch)
        rows = []
        for ex in batch:
            p_ids, a_ids = self.ids(ex)
            target = a_ids + ([self.eos] if eos else [])
            rows.append((p_ids + a_ids + ([self.eos] if eos else []), len(p_ids), target))
        width = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (seq, start, target) in enumerate(rows):
            ids[i, :len(seq)] = torch.tensor(seq)
            labels[i, start:start + len(target)] = torch.tensor(target)
        return ids, labels
