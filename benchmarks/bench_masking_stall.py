"""Does masking one large body stall everyone else? Small-request latency, alone and while a
~1 MB masking request is in flight, against a real vLLM server with masking on.

python -m benchmarks.bench_masking_stall [--size-kb 1024] [--repeats 15] [--profile default]
Measures GET /health and a small masked /v1/completions request (1 token), interleaved: each
repeat times both alone, then starts the large request and times both again while it is being
masked. Writes benchmarks/results/masking_stall.json. Target: in-flight p50 within 50 ms of
the alone p50.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from harness.fixtures import fixture_model
from harness.measure import write_result
from harness.server import VllmServer, post

PROFILES = {"default": {}, "fast": {"ner": "off"}}


def big_prompt(size_kb: int) -> str:
    line = ("Customer Mary Smith wrote from mary.smith{i}@example.com about order {i}; "
            "the delivery address was not given and the parcel is late again. ")
    parts, size, i = [], 0, 0
    while size < size_kb * 1024:
        # a few distinct values, many repeats: realistic for a pasted log or thread
        s = line.format(i=i % 200)
        parts.append(s)
        size += len(s)
        i += 1
    return "".join(parts)


def timed_get(url: str) -> float:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=300) as r:
        r.read()
    return (time.perf_counter() - t) * 1000


def timed_small(url: str) -> float:
    t = time.perf_counter()
    status, body = post(url + "/v1/completions", {"model": "test", "prompt": "mail a@b.org",
                                                  "max_tokens": 1})
    assert status == 200, body
    return (time.perf_counter() - t) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-kb", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="default")
    args = ap.parse_args()
    model = fixture_model("tiny")
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "masking.json"
        cfg.write_text(json.dumps({**PROFILES[args.profile],
                                   "max_placeholders_per_request": 5000,
                                   "max_placeholders_per_session": 5000}))
        log = Path(d) / "server.log"
        srv = VllmServer(str(model), ["--enforce-eager"], log, masking=str(cfg))
        with srv:
            url = srv.url
            big = big_prompt(args.size_kb)
            timed_small(url)  # warm the workers and the engine
            rows: dict[str, list[float]] = {k: [] for k in (
                "health_alone", "small_alone", "health_busy", "small_busy", "large_ms")}
            for r in range(args.repeats):
                rows["health_alone"].append(timed_get(url + "/health"))
                rows["small_alone"].append(timed_small(url))
                done = threading.Event()

                def large(done: threading.Event = done) -> None:
                    t = time.perf_counter()
                    post(url + "/v1/completions",
                                        {"model": "test", "prompt": big, "max_tokens": 1},
                                        timeout=600)
                    rows["large_ms"].append((time.perf_counter() - t) * 1000)
                    done.set()

                th = threading.Thread(target=large)
                th.start()
                time.sleep(0.3)  # the body is sent and being masked
                rows["health_busy"].append(timed_get(url + "/health"))
                rows["small_busy"].append(timed_small(url))
                busy_ok = not done.is_set()
                th.join()
                if not busy_ok:
                    print(f"repeat {r}: the large request finished before the probes; "
                          "use a larger --size-kb")
                print(f"repeat {r + 1}/{args.repeats}: health {rows['health_alone'][-1]:.1f} -> "
                      f"{rows['health_busy'][-1]:.1f} ms, small {rows['small_alone'][-1]:.1f} -> "
                      f"{rows['small_busy'][-1]:.1f} ms, large {rows['large_ms'][-1]:.0f} ms",
                      flush=True)
    summary = {k: {"p50": statistics.median(v), "min": min(v), "max": max(v)}
               for k, v in rows.items()}
    for probe in ("health", "small"):
        delta = summary[f"{probe}_busy"]["p50"] - summary[f"{probe}_alone"]["p50"]
        summary[f"{probe}_added_p50_ms"] = delta
        print(f"{probe}: alone p50 {summary[f'{probe}_alone']['p50']:.1f} ms, with a "
              f"{args.size_kb} KB masking request in flight p50 "
              f"{summary[f'{probe}_busy']['p50']:.1f} ms (+{delta:.1f} ms; target <= 50)")
    write_result("masking_stall", {"size_kb": args.size_kb, "profile": args.profile,
                                   "repeats": args.repeats, "summary": summary, "runs": rows})


if __name__ == "__main__":
    main()
