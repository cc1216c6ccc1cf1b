"""OpenAI-compatible judge backend (vLLM in production), built on the ``openai`` AsyncOpenAI client.

Transport rules (DESIGN §6):

* **Endpoints and balancing.** One ``AsyncOpenAI`` client per endpoint URL. Each request goes to
  the endpoint with the fewest requests in flight (ties: round robin), preferring endpoints not in
  a failure cool-down: an endpoint that just failed with a connection error / 5xx / 429 is avoided
  while another one is available, for ``COOLDOWN_S * 2**(consecutive failures - 1)`` seconds
  (at most ``MAX_COOLDOWN_S``); a success resets it.
* **Backpressure.** At most ``max_in_flight_per_endpoint`` requests are in flight per endpoint;
  further callers wait (vLLM itself queues without bound, so this cap is the backpressure).
* **Timeouts.** ``timeout_s`` per attempt (the client's httpx timeout and an ``asyncio.wait_for``
  bound on the whole attempt).
* **Retries.** Connection errors, timeouts, 408, 429 and 5xx are retried up to ``max_retries`` times
  with exponential backoff ``backoff_s * 2**attempt`` (times a jitter in [0.5, 1]; a 429's
  ``Retry-After`` is honoured up to 30 s); the slot is released while waiting, and the retry may go
  to another endpoint. Other 4xx are never retried: they raise :class:`JudgeRequestError` at once,
  and a 404 about the model lists the served models from ``/v1/models``.
* **Health check.** ``check_health()`` GETs ``<endpoint>/models`` on every endpoint: an unreachable
  endpoint raises :class:`JudgeUnavailableError` naming the URL; a model that is not served raises
  :class:`JudgeModelNotFoundError` listing the served ones. With ``health_check`` on, it also runs
  once, lazily, before the first request.

The client's own retries are off (``max_retries=0``) so that every attempt is counted here.
Clients and the asyncio primitives are bound to the running event loop and rebuilt when it changes
(e.g. successive ``asyncio.run`` calls in tests).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import openai
from openai.types.chat import ChatCompletion

from core.config import OpenAIJudgeConfig
from rewards.judge import (
    BaseJudge,
    Completion,
    JudgeBadResponseError,
    JudgeError,
    JudgeHTTPError,
    JudgeModelNotFoundError,
    JudgeRequestError,
    JudgeTimeoutError,
    JudgeUnavailableError,
    PreparedImage,
)

LOGPROB_SLACK = 1e-3  # float noise above 0 still counts as a log-probability of ~1

log = logging.getLogger("srum.judge.openai")
T = TypeVar("T")

RETRY_STATUS = frozenset({408, 429})
MAX_RETRY_AFTER_S = 30.0
COOLDOWN_S = 0.5
MAX_COOLDOWN_S = 10.0


@dataclass
class Endpoint:
    """One server: its client (per event loop), in-flight count and totals."""

    url: str
    client: openai.AsyncOpenAI | None = None
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    down_until: float = 0.0
    consecutive_failures: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def failed(self) -> None:
        """Start (or extend) this endpoint's cool-down after a server-side failure."""
        self.consecutive_failures += 1
        cooldown = min(MAX_COOLDOWN_S, COOLDOWN_S * 2 ** (self.consecutive_failures - 1))
        self.down_until = time.monotonic() + cooldown


class EndpointPool:
    """Least-in-flight choice among endpoints with a per-endpoint cap (waits when all are full)."""

    def __init__(self, urls: Sequence[str], cap: int):
        if cap < 1:
            raise ValueError(f"max_in_flight_per_endpoint must be >= 1, got {cap}")
        self.endpoints = [Endpoint(u.rstrip("/")) for u in urls]
        self.cap = cap
        self._cond: asyncio.Condition | None = None
        self._rr = 0
        self.waits = 0

    def set_urls(self, urls: Sequence[str]) -> tuple[list[str], list[str]]:
        """Serve from ``urls`` from now on (a launched judge replica added, removed or moved): endpoints that
        stay keep their counters and client; requests in flight on a removed one finish there. Returns
        ``(added, removed)`` URLs."""
        if not urls:
            raise ValueError("a judge needs at least one endpoint")
        wanted = list(dict.fromkeys(u.rstrip("/") for u in urls))
        have = {e.url: e for e in self.endpoints}
        added = [u for u in wanted if u not in have]
        removed = [u for u in have if u not in wanted]
        self.endpoints = [have.get(u) or Endpoint(u) for u in wanted]
        return added, removed

    def rebind(self) -> None:
        """Forget loop-bound state (call when the event loop changed)."""
        self._cond = None
        for ep in self.endpoints:
            ep.in_flight = 0

    def _pick(self) -> Endpoint | None:
        now = time.monotonic()
        free = [e for e in self.endpoints if e.in_flight < self.cap]
        if not free:
            return None
        up = [e for e in free if e.down_until <= now] or free
        least = min(e.in_flight for e in up)
        cands = [e for e in up if e.in_flight == least]
        self._rr += 1
        return cands[self._rr % len(cands)]

    async def acquire(self) -> Endpoint:
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            ep = self._pick()
            if ep is None:
                self.waits += 1
                while ep is None:
                    await self._cond.wait()
                    ep = self._pick()
            ep.in_flight += 1
            ep.requests += 1
            return ep

    async def release(self, ep: Endpoint) -> None:
        assert self._cond is not None
        async with self._cond:
            ep.in_flight -= 1
            self._cond.notify()


def _status_kind(status: int) -> str:
    return "429" if status == 429 else ("5xx" if status >= 500 else ("408" if status == 408 else "4xx"))


class OpenAIJudge(BaseJudge):
    """Judge over one or more OpenAI-compatible endpoints (``cfg.endpoints``)."""

    backend = "openai"

    def __init__(self, cfg: OpenAIJudgeConfig):
        super().__init__(cfg)
        if not cfg.endpoints:
            raise ValueError("judge.endpoints is empty: the openai backend needs at least one URL")
        self.pool = EndpointPool(cfg.endpoints, cfg.max_in_flight_per_endpoint)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._healthy = not cfg.health_check
        self._health_lock: asyncio.Lock | None = None
        self.attempts = 0
        self.retries = 0
        self.attempt_errors: dict[str, int] = {}

    # loop-bound state ------------------------------------------------------------------------
    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        self._loop = loop
        self.pool.rebind()
        self._health_lock = asyncio.Lock()
        for ep in self.pool.endpoints:
            ep.client = self._client(ep.url)

    def _client(self, url: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=url, api_key=self.cfg.api_key_value(), max_retries=0,
                                  timeout=self.cfg.timeout_s)

    def set_endpoints(self, urls: Sequence[str]) -> None:
        """Follow the run's launched judge replicas (``judge.launch``): new URLs get a client on first use,
        removed ones leave the balancing at once."""
        added, removed = self.pool.set_urls(urls)
        if added or removed:
            log.info("judge endpoints: +%s -%s", added or "[]", removed or "[]")

    async def aclose(self) -> None:
        if self._loop is asyncio.get_running_loop():
            for ep in self.pool.endpoints:
                if ep.client is not None:
                    await ep.client.close()
                    ep.client = None
        self._loop = None

    # health ----------------------------------------------------------------------------------
    async def served_models(self, url: str) -> list[str]:
        """Model ids from ``GET <url>/models`` (raises httpx errors)."""
        timeout = min(self.cfg.timeout_s, 10.0)
        async with httpx.AsyncClient(timeout=timeout) as client:
            resp = await client.get(url.rstrip("/") + "/models",
                                    headers={"Authorization": f"Bearer {self.cfg.api_key_value()}"})
            resp.raise_for_status()
            return [m.get("id") for m in resp.json().get("data", []) if isinstance(m, dict)]

    async def check_health(self) -> None:
        """GET ``/models`` on every endpoint; raise naming the first unreachable URL or missing model."""
        for ep in self.pool.endpoints:
            try:
                models = await self.served_models(ep.url)
            except (httpx.HTTPError, ValueError) as err:
                raise JudgeUnavailableError(
                    f"judge endpoint {ep.url} is not healthy: GET {ep.url}/models failed with "
                    f"{type(err).__name__}: {err or 'no details'}. Is the server running on that address?") from err
            if self.cfg.model not in models:
                raise JudgeModelNotFoundError(
                    f"model {self.cfg.model!r} is not served at {ep.url}; served models: {models}. "
                    f"Set judge.model to one of them.")
        self._healthy = True

    async def _ensure_healthy(self) -> None:
        if self._healthy:
            return
        assert self._health_lock is not None
        async with self._health_lock:
            if not self._healthy:
                await self.check_health()

    # transport -------------------------------------------------------------------------------
    def _count(self, ep: Endpoint, kind: str) -> None:
        self.attempt_errors[kind] = self.attempt_errors.get(kind, 0) + 1
        ep.errors[kind] = ep.errors.get(kind, 0) + 1
        ep.failures += 1

    async def _request(self, call: Callable[[openai.AsyncOpenAI], Awaitable[T]]) -> T:
        """Run ``call(client)`` with balancing, the in-flight cap, timeouts and retries."""
        self._bind()
        await self._ensure_healthy()
        last: JudgeError | None = None
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self.retries += 1
            ep = await self.pool.acquire()
            delay = self.cfg.backoff_s * (2 ** attempt) * (0.5 + 0.5 * random.random())
            try:
                self.attempts += 1
                if ep.client is None:  # an endpoint added by set_endpoints
                    ep.client = self._client(ep.url)
                result = await _bounded(call(ep.client), self.cfg.timeout_s)
                ep.consecutive_failures = 0
                return result
            except (TimeoutError, openai.APITimeoutError) as err:
                self._count(ep, "timeout")
                last = JudgeTimeoutError(f"judge request to {ep.url} timed out after {self.cfg.timeout_s} s "
                                         f"({attempt + 1} attempt(s))")
                last.__cause__ = err
            except _NotACompletion as err:  # a proxy's page or a broken body: retried like a 5xx
                self._count(ep, "bad_response")
                ep.failed()
                last = JudgeBadResponseError(f"judge endpoint {ep.url} answered 200 with {err} "
                                             f"({attempt + 1} attempt(s))")
                last.__cause__ = err
            except openai.APIConnectionError as err:
                self._count(ep, "connection")
                ep.failed()
                last = JudgeHTTPError(f"cannot connect to judge endpoint {ep.url}: {err} ({attempt + 1} attempt(s))")
                last.__cause__ = err
            except openai.APIStatusError as err:
                status = err.status_code
                self._count(ep, _status_kind(status))
                if status < 500 and status not in RETRY_STATUS:
                    raise await self._request_error(ep, err) from err
                ep.failed()
                delay = max(delay, _retry_after(err))
                last = JudgeHTTPError(f"judge endpoint {ep.url} answered HTTP {status}: {_short(err)} "
                                      f"({attempt + 1} attempt(s))")
                last.__cause__ = err
            finally:
                await self.pool.release(ep)
            if attempt < self.cfg.max_retries:
                log.warning("judge attempt %d failed (%s); retrying in %.2f s", attempt + 1, last, delay)
                await asyncio.sleep(delay)
        assert last is not None
        log.error("judge request failed after %d attempt(s): %s", self.cfg.max_retries + 1, last)
        raise last

    async def _request_error(self, ep: Endpoint, err: openai.APIStatusError) -> JudgeRequestError:
        msg = f"judge endpoint {ep.url} rejected the request with HTTP {err.status_code} (not retried): {_short(err)}"
        if err.status_code == 404:
            try:
                models = await self.served_models(ep.url)
            except Exception as exc:  # the listing is best effort; the 404 is the error
                models = [f"<could not list models: {exc}>"]
            if self.cfg.model not in models:
                return JudgeModelNotFoundError(
                    f"{msg}. Model {self.cfg.model!r} is not served there; served models: {models}")
        return JudgeRequestError(msg)

    # primitives ------------------------------------------------------------------------------
    def _messages(self, image: PreparedImage, text: str, assistant_prefix: str | None = None) -> list[dict]:
        msgs: list[dict[str, Any]] = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image.data_url}},
            {"type": "text", "text": text}]}]
        if assistant_prefix is not None:
            msgs.append({"role": "assistant", "content": assistant_prefix})
        return msgs

    async def _chat(self, image: PreparedImage, text: str, max_tokens: int,
                    schema: dict[str, Any] | None = None) -> Completion:
        body: dict[str, Any] = {"model": self.cfg.model, "messages": self._messages(image, text),
                                "max_tokens": max_tokens, "temperature": self.cfg.temperature}
        if schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "srum_judge", "schema": schema, "strict": True}}
        return _completion(await self._request(lambda c: _post_chat(c, body)))

    async def _next_probs(self, image: PreparedImage, text: str, assistant_prefix: str,
                          chars: Sequence[str]) -> tuple[dict[str, float], Completion, bool]:
        body: dict[str, Any] = {
            "model": self.cfg.model, "messages": self._messages(image, text, assistant_prefix),
            "max_tokens": 1, "temperature": 0.0, "logprobs": True, "top_logprobs": min(20, max(1, len(chars))),
            # vLLM extensions: continue the assistant's "Score: " and allow only the grammar's next tokens
            "add_generation_prompt": False, "continue_final_message": True,
            "structured_outputs": {"choice": list(chars)}}
        resp = await self._request(lambda c: _post_chat(c, body))
        probs: dict[str, float] = {}
        chosen = ""
        content = resp.choices[0].logprobs.content if resp.choices and resp.choices[0].logprobs else None
        if content:
            chosen = (content[0].token or "").strip()
            for tl in content[0].top_logprobs or []:
                tok, lp = (tl.token or "").strip(), tl.logprob
                # a log-probability is <= 0; a positive (or non-finite, or absurd) one is not used
                if tok in chars and isinstance(lp, int | float) and -1000 < lp <= LOGPROB_SLACK:
                    probs[tok] = probs.get(tok, 0.0) + math.exp(min(lp, 0.0))
        fallback = not probs
        if fallback and chosen in chars:
            probs = {chosen: 1.0}
        return probs, _completion(resp, text=False), fallback

    def _transport_counters(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "retries": self.retries, "attempt_errors": dict(self.attempt_errors),
                "pool_waits": self.pool.waits,
                "endpoints": {e.url: {"in_flight": e.in_flight, "requests": e.requests, "failures": e.failures,
                                      "errors": dict(e.errors)} for e in self.pool.endpoints}}


async def _bounded(aw: Awaitable[T], timeout_s: float) -> T:
    """Await with a deadline; ``asyncio.timeout`` (3.11+) avoids ``wait_for``'s extra task per call."""
    timeout_cm = getattr(asyncio, "timeout", None)
    if timeout_cm is None:  # Python 3.10
        return await asyncio.wait_for(aw, timeout=timeout_s)
    async with timeout_cm(timeout_s):
        return await aw


class _NotACompletion(Exception):
    """A 200 response whose body is no chat completion."""


async def _post_chat(client: openai.AsyncOpenAI, body: dict[str, Any]) -> ChatCompletion:
    """POST /chat/completions through the client's low-level ``post`` with a ready JSON body.

    Same request, response model, errors and timeouts as ``client.chat.completions.create``, minus
    its per-call recursive transform of the typed parameters (~1.8 ms per request here, which
    showed up as lost throughput in bench/judge_client.py), and with vLLM's extra fields inline.
    A body that is not a completion (HTML, broken or other JSON: the client returns it as a string
    or an empty model) raises :class:`_NotACompletion`.
    """
    try:
        resp = await client.post("/chat/completions", body=body, cast_to=ChatCompletion)
    except (ValueError, openai.APIResponseValidationError) as err:  # JSONDecodeError is a ValueError
        raise _NotACompletion(f"a body that is not JSON ({type(err).__name__}: {str(err)[:80]})") from err
    if not isinstance(resp, ChatCompletion) or not resp.choices or resp.choices[0].message is None:
        raise _NotACompletion(f"a body that is not a chat completion: {str(resp)[:120]!r}")
    return resp


def _completion(resp: Any, text: bool = True) -> Completion:
    usage = getattr(resp, "usage", None)
    content = ""
    if text and resp.choices:
        content = resp.choices[0].message.content or ""
    return Completion(text=content, prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                      completion_tokens=getattr(usage, "completion_tokens", 0) or 0)


def _short(err: openai.APIStatusError) -> str:
    body = getattr(err, "body", None)
    msg = None
    if isinstance(body, dict):
        inner = body.get("error")
        msg = inner.get("message") if isinstance(inner, dict) else body.get("message")
    return str(msg or err)[:300]


def _retry_after(err: openai.APIStatusError) -> float:
    try:
        value = float(err.response.headers.get("retry-after", "0"))
    except (TypeError, ValueError, AttributeError):
        return 0.0
    return min(max(value, 0.0), MAX_RETRY_AFTER_S)
