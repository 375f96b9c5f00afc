"""``vllm-guard scrub`` throughput and memory on a synthetic JSONL file.

python -m benchmarks.bench_scrub [--mb 100] [--masking masking.fast.json]
Writes a JSONL file of PII-corpus prompts (streamed to disk), scrubs it in process, and
prints and writes benchmarks/results/scrub.json: MB/s, peak RSS before and after, counts.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from harness.measure import print_result, write_result
from harness.pii_corpus import generate
from vllm_guard.cli.common import config_file
from vllm_guard.masking.config import MaskingConfig
from vllm_guard.masking.detection.detector import build_detector
from vllm_guard.masking.scrub import Scrubber, scrub_file


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mb", type=float, default=100.0)
    ap.add_argument("--masking", default="masking.fast.json")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-scrub-"))
    src = work / "train.jsonl"
    pool = [ex.text for ex in generate(400, seed=5)]
    written, i = 0, 0
    with open(src, "w", encoding="utf-8") as f:
        while written < args.mb * 1e6:
            line = json.dumps({"id": i, "prompt": pool[i % len(pool)],
                               "answer": pool[(i * 7 + 3) % len(pool)]}, ensure_ascii=False)
            f.write(line + "\n")
            written += len(line.encode()) + 1
            i += 1
    scrubber = Scrubber(build_detector(MaskingConfig.load(config_file(args.masking))))
    rss_before = _peak_rss_mb()
    start = time.perf_counter()
    report = scrub_file(src, work / "clean.jsonl", scrubber)
    seconds = time.perf_counter() - start
    result = {"masking": args.masking, "mb": written / 1e6, "lines": report.lines,
              "seconds": seconds, "mb_per_s": written / 1e6 / seconds,
              "peak_rss_mb_before": rss_before, "peak_rss_mb_after": _peak_rss_mb(),
              "distinct_values": report.distinct, "masked": dict(report.masked)}
    for p in work.iterdir():
        p.unlink()
    work.rmdir()
    print_result(result)
    write_result("scrub", result)
    return result


if __name__ == "__main__":
    main()
