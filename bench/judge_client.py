"""Benchmark: judge client throughput against a loopback server with fixed latency.

A stand-in OpenAI-compatible server (aiohttp, its own process, 127.0.0.1 only) answers every chat
completion after exactly ``L`` seconds. The client is the real :class:`rewards.judge_openai.OpenAIJudge`
(``score_global`` in text mode: prompt building, PNG data URL of a prepared image, the request
through the ``openai`` client, parsing) with ``max_in_flight_per_endpoint = C`` and ``C * rounds``
requests issued at once. With perfect pipelining the client completes ``C / L`` requests per
second; efficiency = measured / ideal. Every configuration runs for about ``rounds * L`` seconds.
The mean end-to-end latency includes the wait for a slot (all requests are issued at once). A
reference line runs a bare aiohttp client on the same harness at the primary configuration: the
ceiling set by the machine and the stand-in server, for comparison.

    python bench/judge_client.py                      # default grid, RESULT for C=16, L=0.1 s
    python bench/judge_client.py --grid 8:0.05 32:0.2 --rounds 10

Final line: ``RESULT judge_client_efficiency <value> target=0.9 ok=<true|false>`` (the primary
configuration, ``--primary C:L``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGET = 0.9


def serve(port: int, latency: float) -> None:
    """The loopback server (run in a subprocess): fixed-latency chat completions."""
    from aiohttp import web

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "tiny-vlm", "object": "model"}]})

    # the answer is serialised once: the server's own per-request CPU is not what is measured
    answer = json.dumps({
        "id": "x", "object": "chat.completion", "created": 0, "model": "tiny-vlm",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "Score: 0.5\nReason: fine."}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}).encode()

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(latency)
        return web.Response(body=answer, content_type="application/json")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, backlog=1024)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(port: int, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"loopback server on port {port} did not come up")


async def _measure(url: str, concurrency: int, n: int) -> tuple[float, dict]:
    import numpy as np

    from core.config import OpenAIJudgeConfig
    from rewards.judge import prepare_image
    from srum.registry import make_judge

    cfg = OpenAIJudgeConfig(mode="text", endpoints=[url], max_in_flight_per_endpoint=concurrency,
                            timeout_s=30.0, max_retries=0)
    judge = make_judge(cfg)
    image = prepare_image(np.full((64, 64, 3), 128, np.uint8))
    try:
        await asyncio.gather(*[judge.score_global(image, "warm-up") for _ in range(min(concurrency, 8))])
        t0 = time.perf_counter()
        res = await asyncio.gather(*[judge.score_global(image, f"prompt {i}") for i in range(n)])
        wall = time.perf_counter() - t0
    finally:
        await judge.aclose()
    bad = sum(r.score != 0.5 for r in res)
    if bad:
        raise RuntimeError(f"{bad} of {n} answers were wrong")
    return n / wall, judge.counters()


async def _measure_raw(url: str, concurrency: int, n: int) -> float:
    """Reference: a bare aiohttp client (no judge, no openai client) on the same harness."""
    import aiohttp

    body = {"model": "tiny-vlm", "max_tokens": 512, "temperature": 0.0,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 1500}]}]}
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as session:
        async def one() -> None:
            async with sem, session.post(url + "/chat/completions", json=body) as resp:
                await resp.json()

        await asyncio.gather(*[one() for _ in range(min(concurrency, 8))])
        t0 = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(n)])
        return n / (time.perf_counter() - t0)


def run_config(concurrency: int, latency: float, rounds: int, raw: bool = False) -> dict:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--latency", str(latency)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_up(port)
        url, n = f"http://127.0.0.1:{port}/v1", concurrency * rounds
        if raw:
            rps, counters = asyncio.run(_measure_raw(url, concurrency, n)), {"latency_s_mean": float("nan")}
        else:
            rps, counters = asyncio.run(_measure(url, concurrency, n))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    ideal = concurrency / latency
    return {"C": concurrency, "L": latency, "n": concurrency * rounds, "rps": rps, "ideal": ideal,
            "eff": rps / ideal, "mean_latency_s": counters["latency_s_mean"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="judge client throughput vs the ideal C/L")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--latency", type=float, default=0.1, help=argparse.SUPPRESS)
    ap.add_argument("--grid", nargs="*", default=["1:0.1", "4:0.1", "16:0.1", "64:0.1", "16:0.5"],
                    help="configurations C:L (concurrency : server latency in seconds)")
    ap.add_argument("--primary", default="16:0.1", help="configuration C:L whose efficiency is the RESULT")
    ap.add_argument("--rounds", type=int, default=20, help="requests per configuration = C * rounds")
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve, args.latency)
        return 0
    grid = list(dict.fromkeys([*args.grid, args.primary]))
    print(f"judge client vs loopback server (cpus={os.cpu_count()}, rounds={args.rounds})")
    print(f"{'C':>4} {'L (s)':>6} {'requests':>8} {'req/s':>9} {'ideal C/L':>10} {'efficiency':>10} {'mean e2e lat (s)':>16}")
    results = {}
    for spec in grid:
        c, lat = spec.split(":")
        r = run_config(int(c), float(lat), args.rounds)
        results[spec] = r
        print(f"{r['C']:>4} {r['L']:>6.2f} {r['n']:>8} {r['rps']:>9.1f} {r['ideal']:>10.1f} {r['eff']:>10.3f} "
              f"{r['mean_latency_s']:>16.4f}", flush=True)
    c, lat = args.primary.split(":")
    ref = run_config(int(c), float(lat), args.rounds, raw=True)
    print(f"reference at C={c}, L={lat}: bare aiohttp client {ref['rps']:.1f} req/s = {ref['eff']:.3f} of C/L "
          "(the harness's ceiling on this machine)")
    eff = results[args.primary]["eff"]
    print(f"RESULT judge_client_efficiency {eff:.3f} target={TARGET} ok={'true' if eff >= TARGET else 'false'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
