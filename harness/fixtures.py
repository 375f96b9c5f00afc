"""Local fixture models: built from a seed, with no network.

Two presets:
- ``tiny``: a small Llama trained for a few hundred steps on synthetic tasks
  (so greedy outputs are peaked and task-specific neurons exist);
- ``qwen2-0.5b-shape``: Qwen2-0.5B dimensions, random bf16 weights, for latency.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from harness.cache import cache_key, cached_build
from vllm_guard import envs

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}\n"
    "{% else %}<|assistant|>{{ message['content'] }}</s>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]


@dataclass(frozen=True)
class FixturePreset:
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    architecture: str = "llama"  # "llama" or "qwen2"
    dtype: str = "float32"
    max_position_embeddings: int = 1024
    train_steps: int = 0
    tokenizer_vocab: int = 512
    extra: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


PRESETS: dict[str, FixturePreset] = {
    "tiny": FixturePreset(
        name="tiny",
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 32: supported by vLLM CPU attention
        num_key_value_heads=2,
        vocab_size=512,
        train_steps=400,
    ),
    "qwen2-0.5b-shape": FixturePreset(
        name="qwen2-0.5b-shape",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,  # head_dim 64
        num_key_value_heads=2,
        vocab_size=151936,
        architecture="qwen2",
        dtype="bfloat16",
        max_position_embeddings=4096,
    ),
}


# the tiny shape with random weights: for tests that need a checkpoint, not a model
PRESETS["tiny-random"] = replace(PRESETS["tiny"], name="tiny-random", train_steps=0)


# --- synthetic tasks: used to train the tiny fixture and as calibration data ---

COUNTRIES = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid",
    "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Chile": "Santiago",
    "Cuba": "Havana", "Norway": "Oslo", "Greece": "Athens", "India": "Delhi",
}
WORDS = ["cat", "dog", "sun", "tree", "book", "lamp", "river", "stone", "cloud", "apple",
         "green", "house", "bird", "road", "star", "moon"]


def _task_add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"add {a} and {b}", str(a + b)


def _task_capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(COUNTRIES))
    return f"capital of {country}", COUNTRIES[country]


def _task_reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 3)
    return "reverse " + " ".join(words), " ".join(reversed(words))


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _task_add,
    "capital": _task_capital,
    "reverse": _task_reverse,
}


def task_examples(task: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` prompt/answer pairs of a synthetic task, deterministic from ``seed``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    rng = random.Random(f"{task}:{seed}")
    return [dict(zip(("prompt", "answer"), TASKS[task](rng), strict=True)) for _ in range(n)]


def format_example(prompt: str, answer: str | None = None) -> str:
    """Text as the chat template renders one user turn (and the answer, if given)."""
    text = f"<|user|>{prompt}\n<|assistant|>"
    return text if answer is None else f"{text}{answer}</s>\n"


# --- building ---


def _train_tokenizer(preset: FixturePreset, corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=preset.tokenizer_vocab,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=preset.max_position_embeddings,
    )


def _make_config(preset: FixturePreset, tokenizer):
    import transformers

    common = dict(
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        vocab_size=preset.vocab_size,
        max_position_embeddings=preset.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype=preset.dtype,
    )
    if preset.architecture == "qwen2":
        return transformers.Qwen2Config(**common)
    return transformers.LlamaConfig(head_dim=preset.head_dim, **common)


def _train(model, tokenizer, preset: FixturePreset, seed: int) -> None:
    import torch

    rng = random.Random(seed)
    texts = [
        format_example(**ex)
        for task in TASKS
        for ex in task_examples(task, 400, seed=seed)
    ]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(preset.train_steps):
        batch = rng.sample(texts, 32)
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


# What a fixture model depends on: this builder and the product's model writer.
BUILDER_SOURCES = (Path(__file__), Path(envs.__file__).parent / "secneuron" / "train.py")


def preset_digest(preset: FixturePreset, seed: int) -> str:
    return cache_key({"preset": asdict(preset), "seed": seed}, BUILDER_SOURCES)


def default_cache_dir() -> Path:
    """Tests and benchmarks cache in the checkout's ``.cache`` unless $VLLM_GUARD_CACHE says
    otherwise (set there on import, so the product's demo builders share it)."""
    return envs.cache_dir()


os.environ.setdefault(envs.CACHE, str(Path(__file__).resolve().parents[1] / ".cache"))


def build_fixture(
    out_dir: str | os.PathLike[str], preset: str | FixturePreset = "tiny", seed: int = 0
) -> Path:
    """Build a fixture model into ``out_dir`` (overwritten). Deterministic in ``seed``."""
    import torch
    import transformers

    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
        preset = PRESETS[preset]
    out = Path(out_dir)
    corpus = [format_example(**ex) for task in TASKS for ex in task_examples(task, 200, seed)]
    tokenizer = _train_tokenizer(preset, corpus)
    config = _make_config(preset, tokenizer)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-reproducible training across machines with different cores
    try:
        torch.manual_seed(seed)
        model_cls = (
            transformers.Qwen2ForCausalLM
            if preset.architecture == "qwen2"
            else transformers.LlamaForCausalLM
        )
        model = model_cls(config)
        if preset.train_steps:
            _train(model, tokenizer, preset, seed)
        else:
            # Random weights: make ids the tokenizer cannot decode unlikely, so streamed
            # outputs carry text and benchmarks can count tokens (TPOT, ITL).
            with torch.no_grad():
                model.lm_head.weight[len(tokenizer):] = 0
        model = model.to(getattr(torch, preset.dtype))
    finally:
        torch.set_num_threads(threads)

    from vllm_guard.secneuron.train import save_model

    info = {"preset": asdict(preset), "seed": seed}
    return save_model(model, tokenizer, out,
                      {"vllm_guard_fixture.json": json.dumps(info, indent=1)})


def fixture_model(preset: str = "tiny", seed: int = 0, cache_dir: Path | None = None) -> Path:
    """Path to a cached fixture model, building it on first use."""
    p = PRESETS[preset]
    root = (cache_dir or default_cache_dir()) / "models"
    return cached_build(root, f"{preset}-s{seed}-{preset_digest(p, seed)}",
                        lambda out: build_fixture(out, p, seed))
