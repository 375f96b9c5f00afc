"""In-process component timings (no server): the masker against plain Presidio, and the masked
activation op against plain SiluAndMul.

python -m benchmarks.bench_components  -> benchmarks/results/components.json
python -m benchmarks.bench_components --masker-only  (the masker alone: English and Chinese
~1 KB prompts, ``ours_<profile>`` and ``ours_<profile>_zh``)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time

import torch
import torch.nn.functional as F

from harness.measure import percentile, write_result


def _english_1kb(n: int) -> list:
    """~1 KB English prompts: consecutive corpus examples joined, spans shifted."""
    from harness.pii_corpus import LabelledText, generate

    out, text, spans = [], "", []
    for ex in generate(n * 8, seed=3):
        if ex.lang != "en":
            continue
        spans += [(a + len(text), b + len(text), e) for a, b, e in ex.spans]
        text += ex.text + "\n"
        if len(text) >= 1000:
            out.append(LabelledText(text, spans, "en"))
            text, spans = "", []
            if len(out) == n:
                break
    return out


def _chinese_1kb(n: int) -> list:
    """~1 KB (UTF-8, ~340 characters) Chinese prompts: the corpus's Chinese examples and
    sentences with Chinese names (a cue word or none), joined, spans shifted."""
    from harness.pii_corpus import LabelledText, generate
    from harness.zh_names import zh_name_corpus

    zh = [ex for ex in generate(n * 12, seed=3) if ex.lang == "zh"]
    names = zh_name_corpus(len(zh) * 2, seed=5, cue_share=0.5)
    out, text, spans = [], "", []
    for ex in (e for i, z in enumerate(zh) for e in (z, names[2 * i], names[2 * i + 1])):
        spans += [(a + len(text), b + len(text), e) for a, b, e in ex.spans]
        text += ex.text
        if len(text.encode()) >= 1000:
            out.append(LabelledText(text, spans, "zh"))
            text, spans = "", []
            if len(out) == n:
                break
    return out


def _timed(fn, texts: list[str]) -> list[float]:  # noqa: ANN001 - any callable of a text
    """Seconds per text, after one warm-up call."""
    fn(texts[0])
    times = []
    for t in texts:
        s = time.perf_counter()
        fn(t)
        times.append(time.perf_counter() - s)
    return times


NAME_LOCALES = ("en_US", "en_GB", "en_IN", "de_DE", "es_ES", "fr_FR")


def _profiles() -> dict:
    from vllm_guard.masking.config import MaskingConfig

    return {"ner_names": MaskingConfig(),  # the default: spaCy NER + name gazetteer
            "names": MaskingConfig(ner="off"),  # configs/masking.fast.json
            "regex": MaskingConfig(ner="off", name_lists=False)}  # no PERSON at all


def masker_timings(n: int = 150) -> dict:
    """Our detector + vault + placeholders vs Presidio analyze + anonymize (spaCy sm NER)."""
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import SpacyNlpEngine

    from harness.pii_corpus import generate, score
    from vllm_guard.masking.detection.detector import _offline_tldextract, build_detector
    from vllm_guard.masking.detection.ner import NER_PACKAGE
    from vllm_guard.masking.masker import Masker
    from vllm_guard.masking.pool import DetectorPool
    from vllm_guard.masking.vault import InMemoryVault

    _offline_tldextract()
    profiles = _profiles()
    elsewhere = {loc: [ex for ex in generate(300, seed=4, name_locale=loc) if ex.lang == "en"]
                 for loc in NAME_LOCALES}
    examples = _english_1kb(n)
    texts = [ex.text for ex in examples]
    zh_examples = _chinese_1kb(n)
    result: dict = {"prompts": len(texts), "mean_chars": statistics.mean(map(len, texts)),
                    "zh_prompts": len(zh_examples),
                    "zh_mean_chars": statistics.mean(len(ex.text) for ex in zh_examples),
                    "zh_mean_utf8_bytes": statistics.mean(len(ex.text.encode())
                                                          for ex in zh_examples)}

    def timed(fn) -> list[float]:
        return _timed(fn, texts)

    for profile, cfg in profiles.items():
        det = build_detector(cfg)
        # detection in this thread (workers=0), a fresh session per prompt
        masker = Masker(DetectorPool(lambda det=det: det, None, 0, 60), InMemoryVault())
        loop, sessions = asyncio.new_event_loop(), itertools.count()

        def mask(t: str, m=masker, lp=loop, ids=sessions) -> None:  # noqa: ANN001
            lp.run_until_complete(m.mask_request(f"s{next(ids)}", "/v1/completions",
                                                 {"prompt": t}))

        times = timed(mask)
        zh_times = _timed(mask, [ex.text for ex in zh_examples])
        zh_rep = score(zh_examples, det.detect)
        result[f"ours_{profile}_zh"] = {"p50_ms": percentile(zh_times, 50) * 1e3,
                                        "p99_ms": percentile(zh_times, 99) * 1e3,
                                        "micro_recall": zh_rep["micro_recall"],
                                        "micro_precision": zh_rep["micro_precision"],
                                        "person_recall": zh_rep["entities"]["PERSON"]["recall"]}
        rep = score(examples, det.detect)
        result[f"person_recall_by_name_locale_{profile}"] = {
            loc: score(other, det.detect)["entities"]["PERSON"]["recall"]
            for loc, other in elsewhere.items()}
        result[f"ours_{profile}"] = {"p50_ms": percentile(times, 50) * 1e3,
                                     "p99_ms": percentile(times, 99) * 1e3,
                                     "micro_recall": rep["micro_recall"],
                                     "micro_precision": rep["micro_precision"],
                                     "person_recall": rep["entities"]["PERSON"]["recall"]}
    try:
        from presidio_anonymizer import AnonymizerEngine
    except ImportError:
        result["presidio"] = "presidio-anonymizer not installed (pip install -e '.[bench]')"
        return result
    engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": NER_PACKAGE}])
    analyzer, anonymizer = AnalyzerEngine(nlp_engine=engine), AnonymizerEngine()

    def presidio(t: str) -> None:
        anonymizer.anonymize(text=t, analyzer_results=analyzer.analyze(t, language="en"))

    times = timed(presidio)

    class _Wrap:
        def detect(self, t):
            from vllm_guard.masking.types import Span

            return [Span(r.start, r.end, r.entity_type, r.score)
                    for r in analyzer.analyze(t, language="en")]

    rep = score(examples, _Wrap().detect)
    result["presidio_plain"] = {"p50_ms": percentile(times, 50) * 1e3,
                                "p99_ms": percentile(times, 99) * 1e3,
                                "micro_recall": rep["micro_recall"],
                                "micro_precision": rep["micro_precision"],
                                "person_recall": rep["entities"]["PERSON"]["recall"]}
    for profile in profiles:
        result[f"speedup_{profile}"] = (result["presidio_plain"]["p50_ms"]
                                        / result[f"ours_{profile}"]["p50_ms"])
    return result


def recognizer_costs(n: int = 100) -> dict:
    """Each recognizer of the default profile alone on the ~1 KB prompts: p50 ms per prompt
    (the composite adds overlap resolution and context rules on top)."""
    from vllm_guard.masking.config import MaskingConfig
    from vllm_guard.masking.detection.detector import PresidioDetector, build_detector

    texts = [ex.text for ex in _english_1kb(n)]
    det = build_detector(MaskingConfig())
    parts: dict = {}
    for d in det.detectors:
        if isinstance(d, PresidioDetector):
            for rec in d.analyzer.registry.recognizers:
                parts[rec.name] = lambda t, r=rec: r.analyze(t, r.supported_entities, None)
        else:
            parts[type(d).__name__] = d.detect
    parts["composite (all of the above, resolved)"] = det.detect
    out = {name: round(percentile(_timed(fn, texts), 50) * 1e3, 3)
           for name, fn in parts.items()}
    return {"prompts": len(texts), "p50_ms": out}


def kernel_timings(preset: str = "qwen2-0.5b-shape", repeats: int = 100, rounds: int = 5,
                   threads: int = 1) -> dict:
    """Masked op vs what vLLM runs for SiluAndMul on this CPU, in process, same inputs.

    Baselines: vLLM's native path in eager mode (``F.silu(g) * u``) and compiled (Inductor
    fuses it into one loop, as vLLM's compile mode does on x86). Grants are planned once
    per step by the runner hook (``GrantState.fill``), as in the server. Each ratio is the
    median of ``rounds`` interleaved rounds, with the min and max. One thread by default:
    with two, OpenMP spin-waits made small shapes vary several-fold between runs.
    """
    import numpy as np

    from harness.fixtures import PRESETS
    from vllm_guard.kernels.masked_silu import masked_silu_and_mul_torch
    from vllm_guard.runtime import PUBLIC_BIT
    from vllm_guard.runtime.grant_state import STATE

    torch.set_num_threads(threads)
    size = PRESETS[preset].intermediate_size
    bits = torch.randint(1, 8, (size,), dtype=torch.int64)  # 3 tasks
    bits[torch.rand(size) < 0.87] = -1  # public neurons (13% locked, as in the benchmarks)
    buf = STATE.ensure_buffer(8192)
    native = torch.compile(lambda x: F.silu(x[:, :size]) * x[:, size:], dynamic=True)
    grant_mixes = {"one_grant_all_tasks": [PUBLIC_BIT | 7], "one_grant_one_task": [PUBLIC_BIT | 1],
                   "mixed_3_grants": [PUBLIC_BIT | 1, PUBLIC_BIT | 2, PUBLIC_BIT | 7]}
    out: dict = {}
    for dtype in (torch.float32, torch.bfloat16):
        for tokens in (1, 16, 256):
            x = torch.randn(tokens, 2 * size).to(dtype)
            for mix, per_request in grant_mixes.items():
                if tokens < len(per_request):
                    continue
                counts = np.full(len(per_request), tokens // len(per_request))
                counts[-1] += tokens - counts.sum()
                STATE.fill(per_request, counts)

                def bench(fn) -> float:
                    fn()
                    s = time.perf_counter()
                    for _ in range(repeats):
                        fn()
                    return (time.perf_counter() - s) / repeats * 1e6

                fns = {"eager": lambda x=x: F.silu(x[:, :size]) * x[:, size:],
                       "compiled": lambda x=x: native(x),
                       "masked": lambda x=x: masked_silu_and_mul_torch(x, bits, buf)}
                times: dict[str, list[float]] = {k: [] for k in fns}
                for _ in range(rounds):  # interleaved: drift hits all three alike
                    for k, fn in fns.items():
                        times[k].append(bench(fn))
                row = {f"{k}_us": statistics.median(v) for k, v in times.items()}
                for base in ("eager", "compiled"):
                    r = [m / b for m, b in zip(times["masked"], times[base], strict=True)]
                    row[f"ratio_vs_{base}"] = statistics.median(r)
                    row[f"ratio_vs_{base}_range"] = [min(r), max(r)]
                out[f"{str(dtype).removeprefix('torch.')}_t{tokens}_{mix}"] = row
                print(f"  {dtype} t={tokens:<4} {mix:<20} masked {row['masked_us']:8.1f} us  "
                      f"x{row['ratio_vs_eager']:.2f} eager  x{row['ratio_vs_compiled']:.2f} "
                      "compiled", flush=True)
    # The runner hook's per-step cost (grant buffer + plan), paid once per step, not per layer.
    step: dict[str, float] = {}
    for requests in (1, 16):
        per_request = [PUBLIC_BIT | (1 << (i % 3)) for i in range(requests)]
        counts = np.ones(requests, dtype=np.int64)
        s = time.perf_counter()
        for _ in range(repeats):
            STATE.fill(per_request, counts)
        step[f"decode_{requests}_requests_us"] = (time.perf_counter() - s) / repeats * 1e6
    print(f"  runner hook per step: {step}", flush=True)
    return {"intermediate_size": size, "threads": threads, "shapes": out, "step_hook": step}


def decrypt_timings(preset: str = "qwen2-0.5b-shape", rounds: int = 5) -> dict:
    """Decryption of every opened slice of a locked copy of the preset model, in memory, on
    one thread (GB/s of encrypted bytes, decrypted in place): the loader's own work."""
    import shutil
    import tempfile
    from pathlib import Path

    from benchmarks.bench_crypto import TASKS, random_selection
    from harness.fixtures import fixture_model
    from vllm_guard.secneuron.checkpoint import load_checkpoint
    from vllm_guard.secneuron.keys import TaskKey
    from vllm_guard.secneuron.lock import lock_checkpoint
    from vllm_guard.secneuron.manifest import read_manifest
    from vllm_guard.secneuron.open import decrypt_in_place
    from vllm_guard.secneuron.preflight import open_data_keys

    model = fixture_model(preset)
    keys = {t: TaskKey.generate(t) for t in TASKS}
    work = Path(tempfile.mkdtemp(prefix="bench-decrypt-"))
    try:
        lock_checkpoint(model, random_selection(model, 0.1), keys, work / "locked", None,
                        progress=False)
        manifest = read_manifest(work / "locked")
        data_keys = open_data_keys(manifest, keys)
        runs = []
        for _ in range(rounds):
            ckpt = load_checkpoint(work / "locked")
            rep = decrypt_in_place(ckpt.tensors, manifest, data_keys, workers=1)
            runs.append(rep.gb_per_s)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"preset": preset, "encrypted_bytes": rep.bytes_decrypted,
            "gb_per_s": statistics.median(runs), "gb_per_s_runs": runs}


def main(argv: list[str] | None = None) -> dict:
    # a parser, so a mistyped option is refused instead of running both halves
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--masker-only", action="store_true", help="skip the kernel timings")
    only.add_argument("--kernel-only", action="store_true", help="skip the masker timings")
    args = ap.parse_args(argv)
    res = {}
    if not args.masker_only:
        res["kernel"] = kernel_timings()
    if not args.kernel_only:
        res["masker"] = masker_timings()
        res["recognizers"] = recognizer_costs()
    print(json.dumps(res, indent=1))
    write_result("components", res)
    return res


if __name__ == "__main__":
    main()
