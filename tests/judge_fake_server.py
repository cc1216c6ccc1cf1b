"""A scriptable fake OpenAI-compatible server on 127.0.0.1 (aiohttp, own thread) for judge tests.

It serves ``GET /v1/models``, ``GET /health`` and ``POST /v1/chat/completions``. Chat answers come
from ``answer(body) -> str``; logprob probes (``logprobs`` + a ``structured_outputs.choice``) get
``top_logprobs`` from ``probe(body) -> {token: prob}`` (uniform over the choices by default).
``probe`` may also return ``{"__raw__": [(token, logprob), ...]}`` (sent as is, the first chosen).
``script`` is a list of per-request overrides consumed in order: an int status (error JSON), a
``("delay", seconds)`` pause before answering normally, ``("status", code, headers)``, or
``("body", text[, content_type])``, a raw 200 body (a proxy's page, broken JSON). It
records every request body, and the peak number of chat requests in flight. ``stop()`` closes
the listening socket (connections are refused), ``start()`` reopens it on the same port.

``scene()`` is the judge tests' shared image: a red disc and a blue square on a beige background.
``scorer_answer`` answers every prompt the scorer sends, well formed (the benchmarks' and the launched
replicas' answer); ``python -m tests.judge_fake_server --port P`` serves it until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from PIL import Image, ImageDraw


def scene() -> Image.Image:
    """64x64 RGB: a red disc (4, 6, 30, 34) and a blue square (34, 30, 60, 60) on beige."""
    img = Image.new("RGB", (64, 64), (235, 235, 220))
    d = ImageDraw.Draw(img)
    d.ellipse((4, 6, 30, 34), fill=(200, 30, 30))
    d.rectangle((34, 30, 60, 60), fill=(30, 30, 200))
    return img


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REGION_ID_RE = re.compile(r"Region ID: (\d+), box")


def _request_text(body: dict[str, Any]) -> str:
    """The user text of a chat request (the image part is ignored)."""
    parts = []
    for msg in body.get("messages", []):
        content = msg.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "\n".join(parts)


def scorer_answer(body: dict[str, Any]) -> str:
    """A well-formed judge answer for any prompt the scorer sends: one block per ``Region ID: k, box``
    line for region prompts, one score otherwise; JSON when the request carries a ``response_format``."""
    ids = [int(k) for k in REGION_ID_RE.findall(_request_text(body))]
    structured = "response_format" in body
    if ids:
        if structured:
            return json.dumps({"regions": [{"id": k, "object": "an object", "score": 6, "reason": "fits."}
                                           for k in ids]})
        return "\n".join(f"Region ID: {k}\nIdentified Object: an object\nScore: 0.6\nReason: fits.\n---" for k in ids)
    if structured:
        return json.dumps({"score": 5, "reason": "mostly right."})
    return "Score: 0.5\nReason: mostly right."


def _default_answer(body: dict[str, Any]) -> str:
    return "Score: 0.5\nReason: fine."


class FakeOpenAIServer:
    def __init__(self, models: tuple[str, ...] = ("tiny-vlm",), latency_s: float = 0.0,
                 answer: Callable[[dict[str, Any]], str] = _default_answer,
                 probe: Callable[[dict[str, Any]], dict[str, float]] | None = None, port: int | None = None):
        self.models = list(models)
        self.latency_s = latency_s
        self.answer = answer
        self.probe = probe
        self.script: list[Any] = []
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.port = port or _free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def start(self) -> FakeOpenAIServer:
        async def go() -> None:
            app = web.Application()
            app.router.add_get("/v1/models", self._models)
            app.router.add_get("/health", self._health)
            app.router.add_post("/v1/chat/completions", self._chat)
            self._runner = web.AppRunner(app, shutdown_timeout=0.1)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

        self._call(go())
        return self

    def stop(self) -> None:
        async def go() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
                self._runner = None

        self._call(go())

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    # handlers --------------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            action = self.script.pop(0) if self.script else None
            if isinstance(action, tuple) and action[0] == "body":  # a raw 200 body (a proxy's page, broken JSON)
                return web.Response(text=action[1], content_type=action[2] if len(action) > 2 else "text/html")
            if isinstance(action, tuple) and action[0] == "delay":
                await asyncio.sleep(action[1])
                action = None
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            if isinstance(action, int) or (isinstance(action, tuple) and action[0] == "status"):
                code = action if isinstance(action, int) else action[1]
                headers = {} if isinstance(action, int) else action[2]
                return web.json_response({"error": {"message": f"scripted error {code}", "code": code}},
                                         status=code, headers=headers)
            if body.get("model") not in self.models:
                return web.json_response({"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                                    "code": 404}}, status=404)
            return web.json_response(self._completion(body))
        finally:
            self.in_flight -= 1

    def _completion(self, body: dict[str, Any]) -> dict[str, Any]:
        logprobs = None
        choices = ((body.get("structured_outputs") or {}).get("choice")) or []
        if body.get("logprobs") and choices:
            dist = self.probe(body) if self.probe else {c: 1.0 / len(choices) for c in choices}
            if "__raw__" in dist:  # (token, logprob) pairs sent as they are, first one chosen
                top = [{"token": t, "logprob": lp, "bytes": None} for t, lp in dist["__raw__"]]
            else:
                top = [{"token": t, "logprob": math.log(p) if p > 0 else -9999.0, "bytes": None}
                       for t, p in sorted(dist.items(), key=lambda kv: -kv[1])]
            chosen = top[0]["token"] if top else choices[0]
            logprobs = {"content": [{"token": chosen, "logprob": top[0]["logprob"] if top else 0.0,
                                     "bytes": None, "top_logprobs": top}]}
            content = chosen
        else:
            content = self.answer(body)
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop", "logprobs": logprobs}],
                "usage": {"prompt_tokens": 11, "completion_tokens": 3 if logprobs is None else 1,
                          "total_tokens": 14 if logprobs is None else 12}}


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.judge_fake_server --port P``: serve well-formed scorer answers on 127.0.0.1 until
    SIGTERM or SIGINT (the tests launch it as a run's judge replica, as ``judge.launch.command``)."""
    ap = argparse.ArgumentParser(description="fake OpenAI-compatible judge server on 127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds slept per chat request")
    ap.add_argument("--model", default="tiny-vlm", help="served model name")
    ap.add_argument("--hold-while", default=None, help="do not start serving while this file exists (a test "
                    "holds a restarted replica down for as long as it needs to observe it)")
    args = ap.parse_args(argv)
    while args.hold_while and os.path.exists(args.hold_while):
        time.sleep(0.1)
    server = FakeOpenAIServer(models=(args.model,), latency_s=args.latency, answer=scorer_answer,
                              port=args.port).start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.close()


if __name__ == "__main__":
    main()
