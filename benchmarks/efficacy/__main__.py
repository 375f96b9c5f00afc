"""Protection efficacy: SecNeuron's table, paper-faithful and with lock-aware training.

python -m benchmarks.efficacy [--suite full|ci] [--no-e2e] [--no-dp]
    [--assignments sealed,blocks,extract]
    [--capabilities rev,up] [--seal-steps N] [--no-paper]
python -m benchmarks.efficacy --relearn [--suite full|ci] [--quick] [--variants ...]
    [--targets rev,pii] [--steps N] [--seal-steps N]

Trains (or reuses) the multitask model, locks it as the toolchain does, scores every grant
set of size 1 and 2, and serves the lock-aware checkpoint through vLLM with one API key per
grant set, then adds the DP-SGD baseline (PII learnt with Opacus at epsilon 1, 5 and inf).
Prints the tables and writes benchmarks/results/efficacy.{json,md}.
Full suite: about 30 minutes on 2 cores from scratch, ~5 with every model cached.

--relearn runs the re-learning attacks instead (benchmarks/efficacy/relearn.py) on the CI
suite's model by default (~25 min on 2 cores with models cached, ~35 from scratch) and writes
benchmarks/results/relearn-<suite>.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from benchmarks.efficacy.pipeline import EfficacyConfig, render_markdown, run_efficacy
from benchmarks.efficacy.relearn import VARIANTS as RELEARN_VARIANTS
from benchmarks.efficacy.relearn import RelearnConfig, render_relearn, run_relearn
from harness.measure import RESULTS, write_result
from vllm_guard.secneuron.capability import SealConfig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=["full", "ci"],
                    help="task suite and model (default: full; ci with --relearn)")
    ap.add_argument("--assignments", default="sealed,blocks,extract",
                    help="lock-aware variants to train: sealed (blocks, PII learnt only in its "
                    "block), blocks, extract (PII trained jointly)")
    ap.add_argument("--capabilities", default="",
                    help="capability tasks to seal in heads and neurons of their own, on the "
                    "model trained without them (e.g. rev,up)")
    ap.add_argument("--seal-steps", type=int, default=None,
                    help="training steps of each sealed capability (default: SealConfig's)")
    ap.add_argument("--no-paper", action="store_true",
                    help="skip the paper-faithful extract + lock sweep")
    ap.add_argument("--no-e2e", action="store_true", help="skip the real-server pass")
    ap.add_argument("--no-dp", action="store_true",
                    help="skip the DP-SGD baseline (~10 min per epsilon on 2 cores)")
    ap.add_argument("--out", default=None, help="result name (default efficacy[-ci])")
    ap.add_argument("--relearn", action="store_true",
                    help="fine-tuning attacks on the locked checkpoints instead")
    ap.add_argument("--quick", action="store_true",
                    help="with --relearn: one seed, n=100, full fine-tuning at lr 1e-3 only")
    ap.add_argument("--workers", type=int, default=2, help="with --relearn: parallel attacks")
    ap.add_argument("--variants", default=None,
                    help="with --relearn: locked variants to attack (default: "
                    + ",".join(RELEARN_VARIANTS) + "; also: capability, which also attacks "
                    "never-wide, the never-trained model widened to its shape with zero slots)")
    ap.add_argument("--grid", default=None,
                    help="with --relearn: a cut of the attack grid, e.g. "
                    "'full:1e-3,lora:3e-3;100,1000;0'")
    ap.add_argument("--steps", type=int, default=None,
                    help="with --relearn: fine-tuning steps per attack (default 1000; scored "
                    "at 50, 200, 1000 where below it, and at the end)")
    ap.add_argument("--targets", default=None,
                    help="with --relearn: attacked tasks (default rev,pii)")
    args = ap.parse_args(argv)
    if args.relearn:
        return relearn_main(args)
    args.suite = args.suite or "full"
    config = replace(EfficacyConfig(suite=args.suite), e2e=not args.no_e2e,
                     dp_epsilons=() if args.no_dp else EfficacyConfig.dp_epsilons,
                     assignments=tuple(a for a in args.assignments.split(",") if a),
                     capabilities=tuple(t for t in args.capabilities.split(",") if t),
                     paper=not args.no_paper)
    config = replace(config, seal=_seal(config.seal, args))
    start = time.perf_counter()
    result = run_efficacy(config)
    result["seconds"] = round(time.perf_counter() - start, 1)
    name = args.out or ("efficacy" if args.suite == "full" else f"efficacy-{args.suite}")
    return _report(name, result, render_markdown(result), "efficacy")


def relearn_main(args: argparse.Namespace) -> int:
    # ci by default: the whole grid on the full suite's model takes ~70 min (27 ms a step)
    config = RelearnConfig(suite=args.suite or "ci", workers=args.workers)
    if args.variants is not None:
        config = replace(config, variants=tuple(v for v in args.variants.split(",") if v),
                         benign=tuple(v for v in config.benign if v in args.variants.split(",")))
    if args.grid is not None:  # a cut of the attack grid: METHOD:LR,...;N,...;SEED,...
        methods, sizes, seeds = args.grid.split(";")
        config = replace(config, methods=tuple((m, float(lr)) for m, lr in (
            x.split(":") for x in methods.split(","))),
            examples=tuple(int(n) for n in sizes.split(",")),
            seeds=tuple(int(s) for s in seeds.split(",")))
    if args.steps is not None:
        if args.steps < 1:
            raise SystemExit("--steps must be at least 1")
        config = replace(config, steps=args.steps, checkpoints=tuple(sorted(
            {c for c in config.checkpoints if c < args.steps} | {args.steps})))
    if args.seal_steps is not None:  # the sealed capabilities under attack
        config = replace(config, efficacy=replace(
            config.efficacy, seal=_seal(config.efficacy.seal, args)))
    if args.targets is not None:
        config = replace(config, tasks=tuple(t for t in args.targets.split(",") if t))
    if args.quick:
        config = replace(config, methods=(("full", 1e-3),), examples=(100,), seeds=(0,))
    result = run_relearn(config)
    return _report(args.out or f"relearn-{config.suite}", result, render_relearn(result),
                   "re-learning")


def _seal(seal: SealConfig, args: argparse.Namespace) -> SealConfig:
    if args.seal_steps is None:
        return seal
    if args.seal_steps < 1:
        raise SystemExit("--seal-steps must be at least 1")
    return replace(seal, steps=args.seal_steps)


def _report(name: str, result: dict, md: str, what: str) -> int:
    print("\n" + md)
    write_result(name, result)
    (RESULTS / f"{name}.md").write_text(md + "\n")
    print(f"{what} benchmark took {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
