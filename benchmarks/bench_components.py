"""In-process component timings (no server): the masker against plain Presidio, and the masked
activation op against plain SiluAndMul.

python -m benchmarks.bench_components  -> benchmarks/results/components.json
python -m benchmarks.bench_components --masker-only  (the masker alone: English and Chinese
~1 KB prompts, ``ours_<profile>`` and ``ours_<profile>_zh``)
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import statistics
import time

import torch

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


def _cpu_us(fn, calls: int) -> float:  # noqa: ANN001 - any callable
    """Thread CPU time per call (one torch thread: the calling thread does all the work,
    so time taken by other processes on this shared machine is not counted)."""
    start = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - start) / calls * 1e6


@functools.cache
def _vllm_modules() -> tuple[torch.nn.Module, torch.nn.Module]:
    """vLLM's own ``SiluAndMul`` and ours (the out-of-tree class vLLM builds when grants are
    on, here under a compile-mode config), constructed as vLLM constructs them, once per
    process: after the registration vLLM builds only ours."""
    from vllm.config import CompilationConfig, CompilationMode, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.activation import SiluAndMul

    from vllm_guard.kernels.layer import register_masked_layers

    # --enforce-eager's config: in compile mode vLLM would wrap forward_native in its own
    # torch.compile (CustomOp.maybe_compile); this benchmark compiles the modules itself
    eager = VllmConfig(compilation_config=CompilationConfig(mode=CompilationMode.NONE))
    with set_current_vllm_config(eager):
        native = SiluAndMul()  # before the registration: vLLM's class
    register_masked_layers()
    with set_current_vllm_config(VllmConfig()):  # compile mode: ours gets keep tables
        guard = SiluAndMul()
    if type(guard) is SiluAndMul or type(native) is not SiluAndMul:
        raise RuntimeError("SiluAndMul was registered out of tree before this benchmark")
    return native, guard


def _modules(bits: torch.Tensor, opaque: bool) -> tuple[torch.nn.Module, ...]:
    """:func:`_vllm_modules`, ours masking by ``bits``; with ``opaque``, the other compiled
    forms too: the eager op behind the custom op ``torch.ops.vllm.guard_masked_silu_and_mul``
    (every size before #33) and the bit test on the grant buffer."""
    from vllm_guard.kernels.masked_silu import masked_silu_and_mul_traced, register_custom_op
    from vllm_guard.runtime import GRANT_BUFFER_ATTR, NEURON_BITS_ATTR

    native, guard = _vllm_modules()
    setattr(guard, NEURON_BITS_ATTR, bits)  # as the loader attaches it: makes its keep table
    if not opaque:
        return native, guard
    register_custom_op()
    buf = getattr(guard, GRANT_BUFFER_ATTR)

    class Opaque(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.vllm.guard_masked_silu_and_mul(x, bits, buf)

    class Fused(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return masked_silu_and_mul_traced(x, bits, buf)

    return native, guard, Opaque(), Fused()


def _compile_like_vllm(module: torch.nn.Module) -> torch.nn.Module:
    """As vLLM compiles a model on CPU (platforms/cpu.py, compilation/wrapper.py): Inductor
    with vLLM's options, the whole graph, every guard dropped (so the token dimension must be
    marked dynamic at the first call, and nothing changed in Python is seen again)."""
    options = {"dce": True, "size_asserts": False, "nan_asserts": False,
               "epilogue_fusion": True, "cpp.dynamic_threads": True,
               "guard_filter_fn": torch.compiler.skip_all_guards_unsafe}
    return torch.compile(module, fullgraph=True, dynamic=False, backend="inductor",
                         options=options)


class _Tiny(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def kernel_timings(preset: str = "qwen2-0.5b-shape", repeats: int = 0, rounds: int = 7,
                   threads: int = 1, compiled: bool = True) -> dict:
    """Masked op vs what vLLM runs for SiluAndMul on this CPU, in process, same inputs.

    Both are vLLM modules called as vLLM calls them (``SiluAndMul`` and our out-of-tree
    class). Eager mode (``--enforce-eager``): vLLM's ``F.silu(g) * u`` against our eager
    forward. Compiled mode (vLLM's default), each module compiled the way vLLM compiles the
    model (:func:`_compile_like_vllm`): Inductor's fused ``silu * mul`` against what our
    class traces (``masked_compiled``: the keep-table multiply), and against the other two
    forms (``opaque_compiled``: the eager op behind a custom op, the only form before #33;
    ``fused_compiled``: the bit test on the grant buffer, measured and not shipped).
    Grants are planned once per step by the runner hook (``GrantState.fill``), as in the
    server. Thread CPU time, not wall time: this machine
    is shared. Each ratio is the median of ``rounds`` interleaved rounds of ``repeats``
    calls (0: about 20 ms of calls), with the min and max. One thread by default: with two,
    OpenMP spin-waits made small shapes vary several-fold between runs.

    A compiled call here pays the compiled wrapper's fixed cost (guards are dropped, but
    the module call and AOTAutograd's runtime wrapper remain), as both compiled baselines
    do; in a server the whole model is one graph, so at 1 token the compiled ratios here
    understate the masked op's relative cost (``compiled_call_floor_us`` is that cost).
    """
    import numpy as np

    from harness.fixtures import PRESETS
    from vllm_guard.runtime import NEURON_BITS_ATTR, PUBLIC_BIT
    from vllm_guard.runtime.grant_state import STATE

    torch.set_num_threads(threads)
    size = PRESETS[preset].intermediate_size
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(1, 8, (size,), generator=gen, dtype=torch.int64)  # 3 tasks
    bits[torch.rand(size, generator=gen) < 0.87] = -1  # public (13% locked, as elsewhere)
    STATE.ensure_buffer(8192)
    mods = _modules(bits, opaque=compiled)
    grant_mixes = {"one_grant_all_tasks": [PUBLIC_BIT | 7], "one_grant_one_task": [PUBLIC_BIT | 1],
                   "mixed_3_grants": [PUBLIC_BIT | 1, PUBLIC_BIT | 2, PUBLIC_BIT | 7]}
    out: dict = {}
    floor: dict[str, float] = {}
    for dtype in (torch.float32, torch.bfloat16):
        # vLLM builds the layer under the model's dtype, which is the keep table's
        mods[1].guard_table_dtype = dtype
        setattr(mods[1], NEURON_BITS_ATTR, bits)
        fns_of: dict = {"eager": mods[0], "masked": mods[1]}
        if compiled:
            torch._dynamo.reset()  # guards are dropped: no graph of the other dtype may stay
            names = ("compiled", "masked_compiled", "opaque_compiled", "fused_compiled")
            for name, mod in zip(names, mods, strict=True):
                fns_of[name] = _compile_like_vllm(mod)
                warm = torch.randn(16, 2 * size, generator=gen).to(dtype)
                torch._dynamo.mark_dynamic(warm, 0)  # vLLM's dynamic token dimension
                STATE.fill([PUBLIC_BIT], np.array([16]))
                fns_of[name](warm)
            trivial = _compile_like_vllm(_Tiny())  # what any compiled call costs here
            warm = torch.randn(16, 2, generator=gen).to(dtype)
            torch._dynamo.mark_dynamic(warm, 0)
            trivial(warm)
            floor[str(dtype).removeprefix("torch.")] = statistics.median(
                _cpu_us(lambda w=warm[:1], t=trivial: t(w), 2000) for _ in range(5))
        for tokens in (1, 8, 16, 256):  # 8: about where the bit test stops paying off
            x = torch.randn(tokens, 2 * size, generator=gen).to(dtype)
            for mix, per_request in grant_mixes.items():
                if tokens < len(per_request):
                    continue
                counts = np.full(len(per_request), tokens // len(per_request))
                counts[-1] += tokens - counts.sum()
                STATE.fill(per_request, counts)
                fns = {k: (lambda f=f, x=x: f(x)) for k, f in fns_of.items()}
                ref = fns["masked"]()
                for k in ("masked_compiled", "opaque_compiled", "fused_compiled"):
                    if k in fns:  # the compiled forms compute what the eager one does
                        torch.testing.assert_close(fns[k](), ref, msg=k)
                calls = repeats or max(5, int(20_000 / max(_cpu_us(fns["eager"], 5), 1.0)))
                times: dict[str, list[float]] = {k: [] for k in fns}
                for _ in range(rounds):  # interleaved: drift hits all of them alike
                    for k, fn in fns.items():
                        fn()
                        times[k].append(_cpu_us(fn, calls))
                row: dict = {f"{k}_us": statistics.median(v) for k, v in times.items()}
                pairs = [("masked", "eager", "eager")]
                if compiled:
                    pairs += [("masked_compiled", "compiled", "compiled"),
                              ("opaque_compiled", "compiled", "compiled_opaque"),
                              ("fused_compiled", "compiled", "compiled_fused")]
                for mine, base, label in pairs:
                    r = [m / b for m, b in zip(times[mine], times[base], strict=True)]
                    row[f"ratio_vs_{label}"] = statistics.median(r)
                    row[f"ratio_vs_{label}_range"] = [min(r), max(r)]
                out[f"{str(dtype).removeprefix('torch.')}_t{tokens}_{mix}"] = row
                line = (f"  {str(dtype)[6:]:<8} t={tokens:<4} {mix:<20} eager: masked "
                        f"{row['masked_us']:8.1f} us x{row['ratio_vs_eager']:.2f} "
                        f"[{row['ratio_vs_eager_range'][0]:.2f}-"
                        f"{row['ratio_vs_eager_range'][1]:.2f}]")
                if compiled:
                    line += (f" | compiled: masked {row['masked_compiled_us']:8.1f} us "
                             f"x{row['ratio_vs_compiled']:.2f} "
                             f"[{row['ratio_vs_compiled_range'][0]:.2f}-"
                             f"{row['ratio_vs_compiled_range'][1]:.2f}]"
                             f" (opaque x{row['ratio_vs_compiled_opaque']:.2f},"
                             f" fused x{row['ratio_vs_compiled_fused']:.2f})")
                print(line, flush=True)
    # The runner hook's per-step cost (grant buffer + plan), paid once per step, not per layer.
    step: dict[str, float] = {}
    for requests in (1, 16):
        per_request = [PUBLIC_BIT | (1 << (i % 3)) for i in range(requests)]
        counts = np.ones(requests, dtype=np.int64)
        step[f"decode_{requests}_requests_us"] = _cpu_us(
            lambda p=per_request, c=counts: STATE.fill(p, c), 200)
    print(f"  runner hook per step: {step}; compiled call floor (us): {floor}", flush=True)
    return {"intermediate_size": size, "threads": threads, "timer": "thread CPU time",
            "rounds": rounds, "shapes": out, "step_hook": step,
            "compiled_call_floor_us": floor}


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
