"""Protection efficacy: SecNeuron's table, paper-faithful and with lock-aware training.

python -m benchmarks.efficacy [--suite full|ci] [--no-e2e] [--assignments sealed,blocks,extract]

Trains (or reuses) the multitask model, locks it as the toolchain does, scores every grant
set of size 1 and 2, and serves the lock-aware checkpoint through vLLM with one API key per
grant set. Prints the tables and writes benchmarks/results/efficacy.{json,md}.
Full suite: about 25 minutes on 2 cores from scratch, ~5 with every model cached.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from benchmarks.common import RESULTS, write_result
from benchmarks.efficacy.pipeline import EfficacyConfig, render_markdown, run_efficacy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="full", choices=["full", "ci"])
    ap.add_argument("--assignments", default="sealed,blocks,extract",
                    help="lock-aware variants to train: sealed (blocks, PII learnt only in its "
                    "block), blocks, extract (PII trained jointly)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the real-server pass")
    ap.add_argument("--out", default=None, help="result name (default efficacy[-ci])")
    args = ap.parse_args(argv)
    config = replace(EfficacyConfig(suite=args.suite), e2e=not args.no_e2e,
                     assignments=tuple(a for a in args.assignments.split(",") if a))
    start = time.perf_counter()
    result = run_efficacy(config)
    result["seconds"] = round(time.perf_counter() - start, 1)
    name = args.out or ("efficacy" if args.suite == "full" else f"efficacy-{args.suite}")
    md = render_markdown(result)
    print("\n" + md)
    write_result(name, result)
    (RESULTS / f"{name}.md").write_text(md + "\n")
    print(f"efficacy benchmark took {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
