"""End-to-end latency suite: plain vLLM vs vLLM with vllm-guard, same weights, same requests.

python -m benchmarks [--preset tiny|qwen2-0.5b-shape] [--mode quick|full]
                     [--configs plain,idle,secneuron,grants,sealed,masking,masking-fast,all]
                     [--check]

For each repeat, every configuration gets its own server in turn (interleaved, one at a
time), the same streamed request stream at concurrency 1 and N, ``ignore_eos``. Reports TTFT,
TPOT, ITL and end-to-end latency (p50/p99, as ``vllm bench serve`` defines them) and each
configuration's ratio to plain. Writes JSON, Markdown and a PNG chart to benchmarks/results/.
``--check`` compares with benchmarks/baseline.json and exits 1 on a regression:
- end-to-end ratios at c=1 (TTFT, ITL, e2e medians; TPOT is left out, it moves 30% between
  runs of one server), each allowed ``--tolerance`` plus twice the run's own spread (half
  the range of its per-repeat ratios: use ``--repeats 3`` or more);
- the in-process component figures, which are stable: masked op / plain op, masker p50,
  decryption GB/s on one core, each allowed max(15%, twice either run's spread).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from harness.fixtures import WORDS, fixture_model
from harness.measure import RESULTS, machine_info, percentile
from harness.server import VllmServer
from vllm_guard.grants.credentials import hash_api_key

BASELINE = Path(__file__).resolve().parent / "baseline.json"
CONFIGS = {
    "plain": {},
    "idle": {"guard": True},
    "secneuron": {"guard": True, "locked": True},
    "grants": {"guard": True, "locked": True, "grants": True},
    # grants on a checkpoint with a sealed capability (#35: heads and neurons of its own,
    # harness.locked.SEALED_TASK), every request granted it: heads masked per request
    "sealed": {"guard": True, "locked": True, "grants": True, "sealed": True},
    "masking": {"guard": True, "masking": "default"},
    "masking-fast": {"guard": True, "masking": "fast"},  # name lists instead of spaCy NER
    # detection in a thread of the API server instead of detector processes
    "masking-inline": {"guard": True, "masking": "inline"},
    "all": {"guard": True, "locked": True, "grants": True, "masking": "default"},
}
MODES = {  # input tokens (approx.), output tokens, requests at c=1, concurrency N, requests at N
    "quick": {"input_len": 64, "output_len": 16, "n1": 6, "conc": 4, "nN": 8, "repeats": 1},
    "full": {"input_len": 256, "output_len": 64, "n1": 10, "conc": 8, "nN": 32, "repeats": 3},
    # the least that still gives a p50 per level: for tests of the --check machinery
    "smoke": {"input_len": 64, "output_len": 8, "n1": 4, "conc": 2, "nN": 4, "repeats": 1},
}
PII = " Contact jane.roe@example.com or 13812345678, card 4111 1111 1111 1111."
# API keys of the grants configurations: name -> granted tasks; requests cycle through
# NEURON_KEYS (neuron locks only) or SEALED_KEYS (the sealed capability granted too)
GRANT_SETS = {"add": ["add"], "both": ["add", "capital"], "reverse": ["reverse"],
              "sealed": ["add", "sealed"], "sealed_both": ["add", "capital", "sealed"]}
NEURON_KEYS = ("add", "both", "reverse")
SEALED_KEYS = ("sealed", "sealed_both")


@dataclass
class Sample:
    ttft: float
    e2e: float
    itl: list[float] = field(default_factory=list)
    tokens: int = 0

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / max(self.tokens - 1, 1)


def stream_request(url: str, prompt: str, output_len: int, headers: dict) -> Sample:
    body = {"model": "test", "prompt": prompt, "max_tokens": output_len, "temperature": 0,
            "ignore_eos": True, "stream": True}
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json", **headers})
    start = time.perf_counter()
    first, last, itl, tokens = None, None, [], 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.strip()
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            # every chunk with a choice is a token, even one whose text is "" (a byte of an
            # unfinished UTF-8 character): with random weights, masked and plain prompts
            # generate different text, and counting only non-empty text skewed TTFT 1.5-2x
            if not chunk.get("choices"):
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                itl.append(now - last)
            last, tokens = now, tokens + 1
    end = time.perf_counter()
    return Sample((first or end) - start, end - start, itl, tokens)


def summarize(samples: list[Sample]) -> dict:
    itl = [x for s in samples for x in s.itl]
    out = {}
    for name, vals in (("ttft", [s.ttft for s in samples]), ("tpot", [s.tpot for s in samples]),
                       ("itl", itl), ("e2e", [s.e2e for s in samples])):
        out[f"{name}_p50_ms"] = percentile(vals, 50) * 1000
        out[f"{name}_p99_ms"] = percentile(vals, 99) * 1000
    return out


class BenchWorkspace:
    """Checkpoints, keys and config files the configurations need, built once per run."""

    def __init__(self, preset: str, root: Path):
        self.root, self.preset = root, preset
        self.plain = fixture_model(preset)
        self._locked: dict[bool, tuple[Path, dict]] = {}
        self.tokens = {name: f"vg-bench-{name}" for name in GRANT_SETS}

    def locked(self, sealed: bool = False) -> tuple[Path, dict]:
        """The locked checkpoint and loader config; ``sealed``: with the sealed capability's
        key too (tiny: the locked fixture has one; other presets: a checkpoint widened by
        one, random, built on first use)."""
        if sealed not in self._locked:
            from harness.locked import SEALED_TASK

            tasks = ("add", "capital", "reverse")
            if self.preset == "tiny":
                from harness.locked import locked_fixture

                art = locked_fixture()
                self._locked[sealed] = art.locked, art.loader_config(
                    [*tasks, SEALED_TASK] if sealed else list(tasks))
            else:
                from vllm_guard.secneuron.keys import KeyDir
                from vllm_guard.secneuron.lock import lock_checkpoint

                name = "sealed" if sealed else "locked"
                kd = KeyDir.create(self.root / f"keys-{name}", [*tasks, SEALED_TASK])
                keys = kd.task_keys(tasks)
                model, selection = self.plain, _selection(self.plain, keys)
                if sealed:
                    model, selection = _sealed(self.plain, selection, self.root / "unlocked")
                    keys = kd.task_keys([*tasks, SEALED_TASK])
                lock_checkpoint(model, selection, keys, self.root / name, kd.signer(),
                                progress=False)
                self._locked[sealed] = self.root / name, kd.loader_config(list(keys))
        return self._locked[sealed]

    def grants_file(self, spec: dict) -> str:
        """The API keys of ``spec``'s requests only: serve refuses a key naming a task its
        checkpoint lacks (the sealed task on the neuron-locked checkpoint)."""
        names = SEALED_KEYS if spec.get("sealed") else NEURON_KEYS
        path = self.root / f"grants-{'sealed' if spec.get('sealed') else 'neurons'}.json"
        path.write_text(json.dumps({"mode": "required", "api_keys": [
            {"name": n, "sha256": hash_api_key(self.tokens[n]), "tasks": GRANT_SETS[n]}
            for n in names]}))
        return str(path)

    def request_tokens(self, spec: dict) -> list[str]:
        """The API keys a configuration's requests cycle through."""
        names = SEALED_KEYS if spec.get("sealed") else NEURON_KEYS
        return [self.tokens[n] for n in names]

    def masking_file(self, profile: str) -> str:
        path = self.root / f"masking-{profile}.json"
        path.write_text(json.dumps({"ner": "off" if profile == "fast" else "auto",
                                    "vault": "memory",
                                    **({"detector_workers": 0} if profile == "inline" else {})}))
        return str(path)

    def server(self, name: str, spec: dict, args: list[str], env: dict) -> VllmServer:
        model, extra = self.plain, []
        if spec.get("locked"):
            model, cfg = self.locked(bool(spec.get("sealed")))
            extra = ["--load-format", "secneuron", "--model-loader-extra-config", json.dumps(cfg)]
        return VllmServer(str(model), [*args, *extra], self.root / f"{name}.log",
                          env if spec.get("guard") else {**env, "VLLM_PLUGINS": "__none__"},
                          guard=bool(spec.get("guard")),
                          grants=self.grants_file(spec) if spec.get("grants") else None,
                          masking=self.masking_file(spec["masking"]) if spec.get("masking")
                          else None)


def _sealed(plain: Path, selection, out: Path):
    """``plain`` widened by a random sealed capability (harness.locked's shape: 4 query heads'
    worth, rounded up to whole KV groups, and 32 neurons per layer) and the selection
    locking it beside ``selection``."""
    import torch

    from harness.locked import SEALED_HEADS, SEALED_NEURONS, SEALED_TASK, with_capabilities
    from vllm_guard.secneuron.capability import SealConfig, seal_random
    from vllm_guard.secneuron.selection import Selection

    seal_random(plain, SEALED_TASK, SealConfig(heads=SEALED_HEADS, neurons=SEALED_NEURONS),
                out, torch.Generator().manual_seed(7))
    return out, with_capabilities(selection, Selection.load(out / "lock_selection.json"))


def _selection(model: Path, keys: dict):
    from benchmarks.bench_crypto import random_selection

    sel = random_selection(model, 0.1)
    mapping = dict(zip(sel.tasks, keys, strict=True))
    sel.neurons = {layer: {mapping[t]: v for t, v in per.items()}
                   for layer, per in sel.neurons.items()}
    sel.tasks = list(keys)
    return sel


def suite_prompts(mode: dict, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = max(4, mode["input_len"] // 2)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) + PII
            for _ in range(mode["n1"] + mode["nN"] + 2)]


@dataclass
class AttachedServer:
    """A server someone else started (``--attach``): measured as it is, never stopped."""

    url: str

    def __enter__(self) -> AttachedServer:
        return self

    def __exit__(self, *exc) -> None:
        pass


def run_config(ws: BenchWorkspace, name: str, spec: dict, mode: dict, server_args: list[str],
               env: dict, seed: int, attach: str | None = None) -> dict:
    prompts = suite_prompts(mode, seed)
    toks = ws.request_tokens(spec)
    headers = [{"Authorization": f"Bearer {toks[i % len(toks)]}"} if spec.get("grants") else {}
               for i in range(len(prompts))]
    t0 = time.perf_counter()
    server = AttachedServer(attach) if attach else ws.server(name, spec, server_args, env)
    with server as srv:
        startup = time.perf_counter() - t0
        for i in range(2):  # warm-up
            stream_request(srv.url, prompts[i], mode["output_len"], headers[i])
        seq = [stream_request(srv.url, prompts[2 + i], mode["output_len"], headers[2 + i])
               for i in range(mode["n1"])]
        base = 2 + mode["n1"]
        with ThreadPoolExecutor(mode["conc"]) as pool:
            conc = list(pool.map(lambda i: stream_request(srv.url, prompts[base + i],
                                                          mode["output_len"], headers[base + i]),
                                 range(mode["nN"])))
    return {"startup_s": startup, "c1": summarize(seq), f"c{mode['conc']}": summarize(conc)}


RATIO_METRICS = ("ttft_p50_ms", "tpot_p50_ms", "itl_p50_ms", "e2e_p50_ms")


def ratios(results: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Median over repeats of each p50 metric, divided by plain's."""
    def med(cfg: str, level: str, metric: str) -> float:
        return statistics.median(r[level][metric] for r in results[cfg])

    out = {}
    levels = [k for k in results["plain"][0] if k.startswith("c")]
    for cfg in results:
        if cfg == "plain":
            continue
        out[cfg] = {f"{lvl}_{m}": med(cfg, lvl, m) / med("plain", lvl, m)
                    for lvl in levels for m in RATIO_METRICS if med("plain", lvl, m) > 0}
    return out


def spreads(results: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Half the range of the per-repeat ratios (each repeat against plain's run beside it):
    how much the run itself says a ratio moves. 0 with one repeat."""
    out = {}
    levels = [k for k in results["plain"][0] if k.startswith("c")]
    for cfg, runs in results.items():
        if cfg == "plain":
            continue
        out[cfg] = {}
        for lvl in levels:
            for m in RATIO_METRICS:
                r = [a[lvl][m] / b[lvl][m] for a, b in zip(runs, results["plain"], strict=True)
                     if b[lvl][m] > 0]
                if r:
                    out[cfg][f"{lvl}_{m}"] = (max(r) - min(r)) / 2
    return out


def masking_share(results: dict[str, list[dict]], mode: dict) -> dict:
    """Masking's share of TTFT, from this run: the masker's p50 on the run's own prompts (in
    process, one thread) against plain vLLM's c=1 TTFT p50 measured beside it; and the
    end-to-end TTFT ratio of each masking configuration (detector processes and IPC
    included), with its spread."""
    import asyncio

    from vllm_guard.masking.config import MaskingConfig
    from vllm_guard.masking.detection.detector import build_detector
    from vllm_guard.masking.masker import Masker
    from vllm_guard.masking.pool import DetectorPool
    from vllm_guard.masking.vault import InMemoryVault

    prompts = [p for rep in range(len(results["plain"])) for p in suite_prompts(mode, rep)]
    plain_ttft = statistics.median(r["c1"]["ttft_p50_ms"] for r in results["plain"])
    out: dict = {"plain_ttft_p50_ms": plain_ttft, "prompt_chars": statistics.mean(
        map(len, prompts))}
    for profile, cfg in (("default", MaskingConfig()), ("fast", MaskingConfig(ner="off"))):
        det = build_detector(cfg)
        masker = Masker(DetectorPool(lambda d=det: d, None, 0, 60), InMemoryVault())
        loop = asyncio.new_event_loop()
        times = []
        for i, p in enumerate([prompts[0], *prompts]):
            t = time.perf_counter()
            loop.run_until_complete(masker.mask_request(f"s{i}", "/v1/completions",
                                                        {"prompt": p}))
            times.append(time.perf_counter() - t)
        p50 = percentile(times[1:], 50) * 1e3
        out[profile] = {"masker_p50_ms": p50, "share_of_plain_ttft": p50 / plain_ttft}
    for cfg, runs in results.items():
        if cfg.startswith("masking"):
            r = [a["c1"]["ttft_p50_ms"] / b["c1"]["ttft_p50_ms"]
                 for a, b in zip(runs, results["plain"], strict=True)]
            out[f"{cfg}_ttft_ratio"] = {"median": statistics.median(r),
                                        "min": min(r), "max": max(r)}
    return out


def components(preset: str) -> dict:
    """In-process timings: masker vs plain Presidio, the masked activation op, decryption."""
    from benchmarks.bench_components import decrypt_timings, kernel_timings, masker_timings

    return {"masker": masker_timings(), "kernel": kernel_timings(preset),
            "decrypt": decrypt_timings(preset)}


def component_metrics(comp: dict) -> dict[str, dict]:
    """The stable in-process figures the gate compares: {name: value, spread, better}.
    ``spread`` is the run's own relative half-range (0 where it has one number)."""
    out: dict[str, dict] = {}
    for shape, row in comp.get("kernel", {}).get("shapes", {}).items():
        lo, hi = row["ratio_vs_eager_range"]
        out[f"kernel.{shape}.ratio_vs_eager"] = {
            "value": row["ratio_vs_eager"], "better": "lower",
            "spread": (hi - lo) / 2 / row["ratio_vs_eager"]}
    for name, row in comp.get("masker", {}).items():
        if name.startswith("ours_") and isinstance(row, dict) and "p50_ms" in row:
            out[f"masker.{name}.p50_ms"] = {"value": row["p50_ms"], "better": "lower",
                                            "spread": 0.0}
    dec = comp.get("decrypt")
    if dec:
        lo, hi = min(dec["gb_per_s_runs"]), max(dec["gb_per_s_runs"])
        out["decrypt.gb_per_s_1t"] = {"value": dec["gb_per_s"], "better": "higher",
                                      "spread": (hi - lo) / 2 / dec["gb_per_s"]}
    return out


DEFAULT_CHECK = "c1_ttft_p50_ms,c1_itl_p50_ms,c1_e2e_p50_ms"
COMPONENT_FLOOR = 0.15  # in-process figures move ~5-10% between runs of the same code


def check(current: dict, baseline_path: Path, tolerance: float,
          metrics_checked: str = DEFAULT_CHECK, spread: dict | None = None) -> list[str]:
    """Ratios worse than baseline * (1 + tolerance) + 2 * the run's own spread (half-range
    of the per-repeat ratios; none with one repeat). Only the listed metrics: at concurrency
    > 1 a tiny model's streams arrive in bursts and the ratios are noise."""
    base = json.loads(baseline_path.read_text())["ratios"]
    wanted = set(metrics_checked.split(","))
    failures = []
    for cfg, metrics in current.items():
        for metric, value in metrics.items():
            if metric not in wanted:
                continue
            ref = base.get(cfg, {}).get(metric)
            margin = 2 * (spread or {}).get(cfg, {}).get(metric, 0.0)
            if ref is not None and value > ref * (1 + tolerance) + margin:
                failures.append(f"{cfg}.{metric}: {value:.3f} > baseline {ref:.3f} "
                                f"(+{tolerance:.0%}, spread allowance {margin:.3f})")
    return failures


def check_components(current: dict[str, dict], baseline: dict[str, dict],
                     floor: float = COMPONENT_FLOOR) -> list[str]:
    """Component figures worse than the baseline by more than max(floor, 2 x either run's
    relative spread). Figures missing on either side are not compared."""
    failures = []
    for name, cur in current.items():
        ref = baseline.get(name)
        if ref is None:
            continue
        tol = max(floor, 2 * cur["spread"], 2 * ref.get("spread", 0.0))
        if cur["better"] == "lower" and cur["value"] > ref["value"] * (1 + tol):
            failures.append(f"{name}: {cur['value']:.3f} > baseline {ref['value']:.3f} "
                            f"(+{tol:.0%})")
        if cur["better"] == "higher" and cur["value"] < ref["value"] * (1 - tol):
            failures.append(f"{name}: {cur['value']:.3f} < baseline {ref['value']:.3f} "
                            f"(-{tol:.0%})")
    return failures


def markdown(report: dict) -> str:
    rows = ["| config | " + " | ".join(next(iter(report["ratios"].values()), {})) + " |"]
    rows.append("|---" * (1 + len(next(iter(report["ratios"].values()), {}))) + "|")
    for cfg, m in report["ratios"].items():
        rows.append(f"| {cfg} | " + " | ".join(f"{v:.3f}" for v in m.values()) + " |")
    return "\n".join(rows) + "\n"


def chart(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install -e '.[bench]')")
        return
    cfgs = list(report["ratios"])
    metrics = list(next(iter(report["ratios"].values()), {}))
    fig, ax = plt.subplots(figsize=(max(6, len(cfgs) * 1.6), 4))
    width = 0.8 / max(len(metrics), 1)
    for j, m in enumerate(metrics):
        ax.bar([i + j * width for i in range(len(cfgs))],
               [report["ratios"][c][m] for c in cfgs], width, label=m)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cfgs))], cfgs)
    ax.set_ylabel("ratio to plain vLLM (lower is better)")
    ax.set_title(f"vllm-guard overhead ({report['preset']}, {report['mode']})")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--mode", choices=list(MODES), default="quick")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                    help="--enforce-eager servers (start in ~30 s instead of 1-2 min)")
    ap.add_argument("--no-components", action="store_true")
    ap.add_argument("--no-masking-share", action="store_true",
                    help="skip the in-process masker timing beside plain TTFT")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--check", action="store_true", help="fail on regression vs the baseline")
    ap.add_argument("--baseline", type=Path, default=BASELINE)
    ap.add_argument("--tolerance", type=float, default=0.02,
                    help="relative slack on end-to-end ratios, on top of 2x the run's own "
                         "spread (per-repeat half-range)")
    ap.add_argument("--check-metrics", default=DEFAULT_CHECK,
                    help="comma-separated ratio names --check compares")
    ap.add_argument("--write-baseline", action="store_true")
    ap.add_argument("--guard-server-arg", action="append", default=[], metavar="ARG",
                    help="extra vLLM argument for the guarded configurations only (e.g. "
                    "--guard-server-arg=--middleware=MODULE.CLASS)")
    ap.add_argument("--attach", action="append", default=[], metavar="CONFIG=URL",
                    help="measure an already running server for CONFIG instead of starting "
                    "one (the tests share their servers this way)")
    args = ap.parse_args(argv)
    attached = dict(a.split("=", 1) for a in args.attach if "=" in a)
    if len(attached) != len(args.attach):
        ap.error("--attach takes CONFIG=URL")

    mode = dict(MODES[args.mode])
    if args.repeats:
        mode["repeats"] = args.repeats
    configs = args.configs.split(",")
    if "plain" not in configs:
        configs.insert(0, "plain")
    unknown = set(configs) - set(CONFIGS)
    if unknown or set(attached) - set(configs):
        ap.error(f"unknown config(s) {sorted(unknown | (set(attached) - set(configs)))}; "
                 f"known: {list(CONFIGS)}")
    server_args = ["--enable-prefix-caching"] + (["--enforce-eager"] if args.eager else [])
    if args.preset != "tiny":
        server_args += ["--dtype", "bfloat16", "--gpu-memory-utilization", "0.3"]
    env: dict[str, str] = {}
    t0 = time.perf_counter()
    results: dict[str, list[dict]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="vllm-guard-bench-") as tmp:
        ws = BenchWorkspace(args.preset, Path(tmp))
        total = mode["repeats"] * len(configs)
        for rep in range(mode["repeats"]):
            for cfg in configs:  # interleaved: drift hits every configuration alike
                done = rep * len(configs) + configs.index(cfg)
                print(f"[{time.perf_counter() - t0:6.0f}s] ({done + 1}/{total}) repeat "
                      f"{rep + 1}: {cfg}", flush=True)
                guarded = args.guard_server_arg if CONFIGS[cfg].get("guard") else []
                results[cfg].append(run_config(ws, cfg, CONFIGS[cfg], mode,
                                               [*server_args, *guarded], env, seed=rep,
                                               attach=attached.get(cfg)))
    report = {"preset": args.preset, "mode": args.mode, "workload": mode,
              "eager": args.eager, "machine": machine_info(), "results": results,
              "ratios": ratios(results), "spreads": spreads(results),
              "seconds": time.perf_counter() - t0}
    if any(c.startswith("masking") for c in configs) and not args.no_masking_share:
        report["masking_share"] = masking_share(results, mode)
        print("masking share of TTFT:", json.dumps(report["masking_share"], indent=1))
    if not args.no_components:
        print(f"[{time.perf_counter() - t0:6.0f}s] component timings", flush=True)
        report["components"] = components(args.preset)
        report["component_metrics"] = component_metrics(report["components"])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"suite-{args.preset}-{args.mode}"
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1))
    Path(f"{stem}.md").write_text(markdown(report))
    chart(report, Path(f"{stem}.png"))
    print(markdown(report))
    print(f"wrote {stem}.json/.md/.png in {report['seconds']:.0f} s")
    if args.write_baseline:
        args.baseline.write_text(json.dumps({
            "preset": args.preset, "mode": args.mode, "machine": report["machine"],
            "repeats": mode["repeats"], "ratios": report["ratios"],
            "spreads": report["spreads"],
            "components": report.get("component_metrics", {})}, indent=1))
        print(f"wrote baseline {args.baseline}")
    if args.check:
        if mode["repeats"] < 3:
            print(f"check: {mode['repeats']} repeat(s): the run cannot measure its own spread; "
                  "use --repeats 3 or more for a tolerance the spread justifies")
        failures = check(report["ratios"], args.baseline, args.tolerance, args.check_metrics,
                         report["spreads"])
        base_components = json.loads(args.baseline.read_text()).get("components", {})
        failures += check_components(report.get("component_metrics", {}), base_components)
        for f in failures:
            print("REGRESSION:", f)
        print("check:", "FAILED" if failures else "passed")
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
