"""The demo's task suite and the multitask model trained on it (no network, seeded).

Three capability tasks a newcomer can read at a glance: ``inc`` ``INC 412050=523161`` (each
digit plus one), ``rev`` ``REV abcdef=fedcba`` and ``up`` ``UP abcdef=ABCDEF``; the last two
share lower-case letters (the hard case for locking). Inputs are 6 characters, and other
lengths get no reliable answer (the guide says so): trained on lengths 1-10 with the same
budget, the model fell to 0.80-0.90 on 10-character inputs and the bar's margin to 0.01.
Each task has a held-out test split that training never samples.

The tokenizer is character level, so every answer character is one token and greedy
exact match equals "every teacher-forced argmax is right" (one forward pass per batch).

The efficacy benchmark extends this suite (more tasks, synthetic personal records) outside
the product, in ``harness/efficacy_suite.py``: :class:`SuiteConfig` and :class:`TaskSuite`
are built to be subclassed, and :func:`train_base` trains any subclass's suite.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from vllm_guard.secneuron.examples import Example

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
BOS = SPECIAL[1]
# The chat template the demo model ships with, so /v1/chat/completions and /v1/responses
# work: the prompt is BOS plus the last user message's text, exactly what /v1/completions
# tokenizes (vLLM adds no special tokens to a chat prompt, so the template emits BOS; its
# /v1/responses does add them, hence two BOS there: see with_double_bos). The
# model has no conversation format to learn: one task prompt in, its answer out; system
# messages (a Responses call's ``instructions``) and earlier turns are not shown to it.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(prompt='') -%}"
    "{%- for message in messages if message['role'] == 'user' -%}"
    "{%- set ns.prompt = message['content'] -%}"
    "{%- endfor -%}"
    "{{- bos_token + ns.prompt -}}")
Generator = Callable[[random.Random], Example]


def _inc(rng: random.Random) -> Example:
    d = "".join(rng.choice(string.digits) for _ in range(6))
    return {"prompt": f"INC {d}=", "answer": "".join(str((int(c) + 1) % 10) for c in d)}


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(6))


def _rev(rng: random.Random) -> Example:
    w = _word(rng)
    return {"prompt": f"REV {w}=", "answer": w[::-1]}


def _up(rng: random.Random) -> Example:
    w = _word(rng)
    return {"prompt": f"UP {w}=", "answer": w.upper()}


GENERATORS: dict[str, Generator] = {"inc": _inc, "rev": _rev, "up": _up}


@dataclass(frozen=True)
class SuiteConfig:
    tasks: tuple[str, ...] = tuple(GENERATORS)
    test_size: int = 200  # held-out examples per capability task
    # model
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4  # head_dim 32: supported by vLLM CPU attention
    # training
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


# `vllm-guard demo`: the three capability tasks.
# 128 wide, 2 layers: learns "rev" by step ~300, where a 64-wide model had not at 1200
# (measured on 2 CPU cores); 500 steps take ~50 s single-threaded.
DEMO_SUITE = SuiteConfig(tasks=("inc", "rev", "up"), hidden_size=128, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, steps=500)


def with_double_bos(examples: list[Example], share: float,
                    rng: random.Random) -> list[Example]:
    """``examples`` with a ``share`` of their prompts led by a second BOS, as vLLM's
    /v1/responses sends them: it tokenizes the rendered chat prompt, which holds BOS, with
    special tokens added (chat and completions give one BOS)."""
    return [{**ex, "prompt": BOS + ex["prompt"]} if share and rng.random() < share else ex
            for ex in examples]


@dataclass
class TaskSuite:
    """Deterministic splits; ``sample_train`` never returns a test example."""

    generators: ClassVar[Mapping[str, Generator]] = GENERATORS

    config: SuiteConfig
    test: dict[str, list[Example]]

    @classmethod
    def build(cls, config: SuiteConfig) -> TaskSuite:
        rng = random.Random(f"suite:{config.seed}")
        return cls(config, cls.test_splits(config, config.tasks, rng))

    @classmethod
    def test_splits(cls, config: SuiteConfig, tasks: Iterable[str],
                    rng: random.Random) -> dict[str, list[Example]]:
        """``config.test_size`` distinct examples per task, drawn from ``rng`` in order."""
        test: dict[str, list[Example]] = {}
        for task in tasks:
            gen = cls.generator(task)
            seen: dict[str, Example] = {}
            while len(seen) < config.test_size:
                ex = gen(rng)
                seen[ex["prompt"]] = ex
            test[task] = list(seen.values())
        return test

    @classmethod
    def generator(cls, task: str) -> Generator:
        if task not in cls.generators:
            raise ValueError(f"unknown task {task!r} for {cls.__name__} "
                             f"(known: {', '.join(cls.generators)})")
        return cls.generators[task]

    def sample_train(self, task: str, rng: random.Random) -> Example:
        held = {ex["prompt"] for ex in self.test[task]}
        gen = self.generator(task)
        while True:
            ex = gen(rng)
            if ex["prompt"] not in held:
                return ex

    def train_set(self, task: str, n: int, seed: int) -> list[Example]:
        rng = random.Random(f"train:{task}:{seed}")
        return [self.sample_train(task, rng) for _ in range(n)]


def build_tokenizer():
    """Character-level tokenizer (byte-level BPE with no merges); adds ``<s>`` like Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(SPECIAL) + len(alphabet), special_tokens=SPECIAL,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(["a"], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", model_max_length=64)


def add_chat_template(model_dir: Path) -> None:
    """Give a trained model directory's tokenizer :data:`CHAT_TEMPLATE`. Added after
    training: with a chat template, :class:`AnswerBatcher` encodes one example at a time
    (the same ids here, but slower)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(model_dir)


def build_model(config: SuiteConfig, tokenizer):
    """An untrained Llama of ``config``'s shape for ``tokenizer``."""
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        vocab_size=len(tokenizer), max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, torch_dtype="float32")
    return transformers.LlamaForCausalLM(cfg)


def train_base(suite: TaskSuite, out: Path, progress: Callable[[str], None] = print) -> Path:
    """Train the multitask model jointly on every task of the suite and save it to ``out``."""
    import torch

    from vllm_guard.secneuron.examples import AnswerBatcher
    from vllm_guard.secneuron.train import fit, save_model

    cfg = suite.config
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    model = build_model(cfg, tokenizer)
    batcher = AnswerBatcher(tokenizer)
    rng = random.Random(f"base:{cfg.seed}")

    def batch_loss() -> torch.Tensor:
        batch = [suite.sample_train(rng.choice(cfg.tasks), rng) for _ in range(cfg.batch_size)]
        ids, labels = batcher.encode(batch)
        return model(input_ids=ids, labels=labels).loss

    fit(model, batch_loss, cfg.steps, cfg.lr, "base model", progress, every=250)
    return save_model(model, tokenizer, out,
                      {"vllm_guard_suite.json": json.dumps(asdict(cfg), indent=1)})
