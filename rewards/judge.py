"""The understanding module as judge: one interface, two backends, three scoring modes.

Backends (``judge.backend``; the composition root, :mod:`srum.registry`, maps each to its class):

* ``openai`` (:mod:`rewards.judge_openai`): any OpenAI-compatible chat-completions server (vLLM in
  production): several endpoints, least-in-flight balancing, a per-endpoint in-flight cap (the
  backpressure), timeouts, retries with backoff on connection errors / timeouts / 429 / 5xx, no
  retry on other 4xx, a health check that names the URL.
* ``transformers`` (:mod:`rewards.judge_hf`): the same prompts in-process through
  ``AutoModelForImageTextToText`` (``from_pretrained`` or a tiny random Qwen2.5-VL).

Modes (``JudgeConfig.mode``), the same on both backends:

* ``text``: the prompts of :mod:`rewards.prompts`, answers read by :mod:`rewards.parse`.
* ``structured``: the JSON variant of the prompts with the bounded schemas of :mod:`rewards.prompts`
  (score = integer tenths -10..10) enforced by the server's structured outputs (vLLM:
  ``response_format={"type": "json_schema", ...}``; the old ``guided_json`` field is silently
  ignored by vLLM, so it is never used) or, in-process, by a small schema-directed decoder.
* ``logprob``: the *expected* score under the judge's own distribution. The answer is started for
  the model as ``Score: `` (the assistant message is continued), and the score grammar
  ``-?(1.0|0.d)`` is explored as a tree of four constrained next-token distributions:
  ``p(first ∈ {-, 0, 1} | "Score: ")``, ``p({0, 1} | "Score: -")``, ``p(d | "Score: 0.")`` and
  ``p(d | "Score: -0.")``. Together they give the exact probability of each of the 21 tenths
  (:func:`tenths_distribution`) -- exact as long as ``-``, ``.`` and the digits are single tokens,
  which holds for Qwen2/Qwen2.5 tokenizers and the byte-level tiny models. A probe that gives no
  distribution at all (no allowed token in the top logprobs and none chosen) where it matters
  (:func:`probe_failed`) gives no score, outcome ``probe_failed``: never a uniform guess. On vLLM each probe is a ``max_tokens=1`` request with
  ``continue_final_message`` and a ``structured_outputs.choice`` constraint (vLLM then reports the
  log-probabilities renormalised over the allowed tokens); in-process they are read from the logits.
  Regions in logprob mode: one text-mode request of the hybrid prompt gives each region's
  identified object and reason; then each region's score is the expectation under the prefix
  ``Region ID: k / Identified Object: <object> / Score: `` (the prompt's answer format). A
  global/sample score in logprob mode has no reason (nothing is generated).

Every call records one request outcome (:data:`OUTCOMES`: ``ok``; ``ambiguous``, an answer the parser
could read only with a doubt its grammar names (another scale, conflicting scores, a clamp, a score
only in unfinished thinking, ...: the best reading is kept and the scorer applies
``judge.on_ambiguous``); ``parse_failed``; ``probe_failed``, a logprob probe that gave no
distribution; and the transport failures ``http_error``, ``bad_response`` (a 200 whose body is no
completion) and ``timeout``), its latency and tokens; :meth:`BaseJudge.counters` exposes the totals.
Transport failures after retries raise :class:`JudgeError` subclasses (after being counted); the
scorer turns them into failed samples.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from core.config import JudgeConfig
from rewards import parse as P
from rewards import prompts as Q

log = logging.getLogger("srum.judge")

Outcome = Literal["ok", "ambiguous", "parse_failed", "probe_failed", "http_error", "bad_response", "timeout"]
RequestKind = Literal["global", "sample", "regions", "grounding"]
OUTCOMES: tuple[str, ...] = get_args(Outcome)
PROBE_BRANCH_MIN = 0.01  # a failed logprob probe matters when its branch of the score tree has this much mass
TENTHS: tuple[int, ...] = tuple(Q.SCORE_TENTHS)
DIGITS: tuple[str, ...] = tuple("0123456789")
W_LOGPROB_FALLBACK = "logprob_fallback"  # no allowed token in a probe's top logprobs: the chosen token used
W_PROBE_FAILED = "probe_failed"  # a probe that matters gave no distribution at all: no score

__all__ = [
    "BaseJudge", "Completion", "JudgeBadResponseError", "JudgeError", "JudgeHTTPError", "JudgeModelNotFoundError", "JudgeRequestError",
    "JudgeResult", "JudgeTimeoutError", "RequestKind", "JudgeUnavailableError", "PreparedImage", "RegionsJudgeResult",
    "expected_score", "positional_regions_schema", "probe_failed", "prepare_image", "tenths_distribution",
]


# ----- errors ------------------------------------------------------------------------------------


class JudgeError(RuntimeError):
    """A judge call failed after retries (or could not be retried). ``kind`` is its outcome."""

    kind: str = "http_error"


class JudgeHTTPError(JudgeError):
    """Connection errors, 429 or 5xx that outlived the retries."""


class JudgeBadResponseError(JudgeError):
    """Answers that were not completions (a proxy's HTML page, broken JSON) that outlived the retries."""

    kind = "bad_response"


class JudgeTimeoutError(JudgeError):
    """Every attempt timed out."""

    kind = "timeout"


class JudgeRequestError(JudgeError):
    """A 4xx other than 408/429: the request itself is wrong; never retried."""


class JudgeModelNotFoundError(JudgeRequestError):
    """The configured model is not served; the message lists the served models."""


class JudgeUnavailableError(JudgeError):
    """The health check at start failed; the message names the URL."""


# ----- records -----------------------------------------------------------------------------------


class JudgeResult(BaseModel):
    """One score from the judge (global, sample-level, or one region)."""

    model_config = ConfigDict(frozen=True)
    score: float | None = Field(description="score in [-1, 1]; None when none could be read")
    reason: str = Field("", description="the judge's justification ('' in logprob mode for global scores)")
    label: str | None = Field(None, description="regions: the object the judge identified")
    outcome: str = Field("ok", description="ok / ambiguous / parse_failed / probe_failed (of this score)")
    warnings: tuple[str, ...] = Field((), description="parser / probe warning codes")
    probs: tuple[float, ...] | None = Field(None, description="logprob mode: P(score = t/10), t = -10..10")
    raw: str = Field("", description="raw answer text (the request's, for regions)")
    latency_s: float = Field(0.0, description="wall time of the request(s) behind this score")
    prompt_tokens: int = Field(0, description="prompt tokens of the request(s)")
    completion_tokens: int = Field(0, description="completion tokens of the request(s)")


class RegionsJudgeResult(BaseModel):
    """Scores of a region list judged in one (hybrid) request; ``regions[k-1]`` is Region ID k."""

    model_config = ConfigDict(frozen=True)
    regions: tuple[JudgeResult, ...] = Field(description="one result per box, in box order")
    outcome: str = Field("ok", description="request outcome: ok / ambiguous / parse_failed / probe_failed")
    warnings: tuple[str, ...] = Field((), description="answer-level warning codes")
    raw: str = Field("", description="raw answer text")
    latency_s: float = Field(0.0, description="wall time of the request(s)")
    prompt_tokens: int = Field(0, description="prompt tokens")
    completion_tokens: int = Field(0, description="completion tokens")


@dataclass
class Completion:
    """What a backend returns for one chat request."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Counters:
    """Request totals of one judge (see :meth:`BaseJudge.counters`)."""

    requests: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    latency_s_sum: float = 0.0
    latency_s_max: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    regions_missing: int = 0
    regions_ambiguous: int = 0
    logprob_fallbacks: int = 0


# ----- images ------------------------------------------------------------------------------------


class PreparedImage:
    """An image converted once for all the requests about it (PIL RGB + cached PNG data URL)."""

    def __init__(self, image: Any):
        self.pil = _to_pil(image)

    @cached_property
    def data_url(self) -> str:
        buf = io.BytesIO()
        self.pil.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    @property
    def size(self) -> tuple[int, int]:
        return self.pil.size


def _to_pil(image: Any) -> Image.Image:
    if isinstance(image, PreparedImage):
        return image.pil
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image must be HxWx3, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {arr.dtype}")
    return Image.fromarray(arr, "RGB")


def prepare_image(image: Any) -> PreparedImage:
    """PIL image, uint8 HxWx3 array or tensor -> :class:`PreparedImage` (idempotent)."""
    return image if isinstance(image, PreparedImage) else PreparedImage(image)


# ----- logprob mode: pure math -------------------------------------------------------------------


def _norm(p: dict[str, float], keys: Sequence[str]) -> list[float]:
    vals = [max(0.0, float(p.get(k, 0.0))) if math.isfinite(float(p.get(k, 0.0))) else 0.0 for k in keys]
    s = sum(vals)
    return [v / s for v in vals] if s > 0 else [1.0 / len(keys)] * len(keys)


def tenths_distribution(first: dict[str, float], neg_int: dict[str, float], pos_tenth: dict[str, float],
                        neg_tenth: dict[str, float]) -> list[float]:
    """P(score = t/10) for t = -10..10 from the four probe distributions (each renormalised).

    ``first`` over {"-", "0", "1"} after ``Score: ``; ``neg_int`` over {"0", "1"} after ``Score: -``;
    ``pos_tenth`` / ``neg_tenth`` over the digits after ``Score: 0.`` / ``Score: -0.``. "1" is
    followed by ".0" by the grammar; "-0.0" is the score 0.
    """
    p_minus, p_zero, p_one = _norm(first, ["-", "0", "1"])
    n_zero, n_one = _norm(neg_int, ["0", "1"])
    pos = _norm(pos_tenth, DIGITS)
    neg = _norm(neg_tenth, DIGITS)
    out = [0.0] * 21  # index t + 10
    out[20] += p_one
    out[0] += p_minus * n_one
    for d in range(10):
        out[10 + d] += p_zero * pos[d]
        out[10 - d] += p_minus * n_zero * neg[d]
    return out


def expected_score(probs: Sequence[float]) -> float:
    """Expectation of t/10 under ``probs`` over t = -10..10."""
    return float(sum(p * t / 10.0 for p, t in zip(probs, TENTHS, strict=True)))


def probe_failed(first: dict[str, float], neg_int: dict[str, float], pos_tenth: dict[str, float],
                 neg_tenth: dict[str, float]) -> bool:
    """Whether the four probe distributions cannot give a score: the first is empty, or a later one is
    empty while its branch (``-``, ``0.``, ``-0.``) has at least :data:`PROBE_BRANCH_MIN` of the mass."""
    if not _mass(first):
        return True
    p_minus, p_zero, _ = _norm(first, ["-", "0", "1"])
    n_zero = _norm(neg_int, ["0", "1"])[0] if _mass(neg_int) else 1.0
    branches = ((neg_int, p_minus), (pos_tenth, p_zero), (neg_tenth, p_minus * n_zero))
    return any(not _mass(d) and mass >= PROBE_BRANCH_MIN for d, mass in branches)


def _mass(p: dict[str, float]) -> float:
    return sum(max(0.0, v) for v in p.values() if math.isfinite(v))


PROBE_TREE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("", ("-", "0", "1")), ("-", ("0", "1")), ("0.", DIGITS), ("-0.", DIGITS))
"""(suffix after the score prefix, allowed next characters) of the four logprob probes."""


# ----- the interface -----------------------------------------------------------------------------


class BaseJudge:
    """Mode logic shared by the backends; a backend implements :meth:`_chat` and :meth:`_next_probs`."""

    backend = "base"

    def __init__(self, cfg: JudgeConfig):
        self.cfg = cfg
        self.mode: str = cfg.mode
        self._c = Counters()
        self._listeners: list[Callable[[RequestKind, str, float], None]] = []

    def add_listener(self, fn: Callable[[RequestKind, str, float], None]) -> None:
        """Call ``fn(kind, outcome, latency_s)`` after every request (e.g. to export metrics); ``kind`` is what
        the request asked for: ``global``, ``sample``, ``regions`` or ``grounding``."""
        self._listeners.append(fn)

    # backend primitives ---------------------------------------------------------------------
    async def _chat(self, image: PreparedImage, text: str, max_tokens: int,
                    schema: dict[str, Any] | None = None) -> Completion:
        """One chat request: free text, or JSON constrained by the bounded ``schema``."""
        raise NotImplementedError

    async def _next_probs(self, image: PreparedImage, text: str, assistant_prefix: str,
                          chars: Sequence[str]) -> tuple[dict[str, float], Completion, bool]:
        """Next-token distribution over ``chars`` after the assistant began with ``assistant_prefix``.

        Returns (probabilities, token usage, fallback_used).
        """
        raise NotImplementedError

    async def check_health(self) -> None:
        """Raise :class:`JudgeUnavailableError` (naming the URL) when the judge cannot serve."""

    async def aclose(self) -> None:
        """Release clients / models."""

    def _transport_counters(self) -> dict[str, Any]:
        return {}

    # public API -------------------------------------------------------------------------------
    async def score_global(self, image: Any, prompt: str) -> JudgeResult:
        """Global-layout score of ``image`` for ``prompt``."""
        return await self._score_single(prepare_image(image), prompt, Q.global_layout_prompt, "global")

    async def score_sample(self, image: Any, prompt: str) -> JudgeResult:
        """Sample-level (whole-image) score, for ``reward.granularity == "sample"``."""
        return await self._score_single(prepare_image(image), prompt, Q.sample_level_prompt, "sample")

    async def score_regions(self, image: Any, prompt: str,
                            boxes: Sequence[Sequence[float]]) -> RegionsJudgeResult:
        """Score all ``boxes`` (pixel x1, y1, x2, y2) in one hybrid request; ids are 1..n."""
        if len(boxes) == 0:
            return RegionsJudgeResult(regions=())
        img = prepare_image(image)
        ids = list(range(1, len(boxes) + 1))
        t0 = time.perf_counter()
        try:
            if self.mode == "structured":
                comp = await self._chat(img, Q.region_prompt(prompt, boxes, structured=True), self.cfg.max_tokens,
                                        positional_regions_schema(Q.regions_json_schema(ids), ids))
                parsed = P.parse_regions_json(comp.text, ids)
                usage = [comp]
            else:
                comp = await self._chat(img, Q.region_prompt(prompt, boxes), self.cfg.max_tokens)
                parsed = P.parse_regions_text(comp.text, ids)
                usage = [comp]
        except JudgeError as err:
            self._record("regions", err.kind, time.perf_counter() - t0, 0, 0)
            raise
        results = [_from_parse(parsed.regions[k], label=True) for k in ids]
        self._c.regions_missing += sum(r.score is None for r in results)  # what the answer itself lacked
        if self.mode == "logprob":
            text = Q.region_prompt(prompt, boxes)
            try:
                probed = await asyncio.gather(*[
                    self._expected(img, text, _region_prefix(k, r.label)) for k, r in zip(ids, results, strict=True)])
            except JudgeError as err:
                self._record("regions", err.kind, time.perf_counter() - t0, *_tokens(usage))
                raise
            results = [r.model_copy(update={"score": s, "probs": None if s is None else tuple(pr),
                                            "outcome": "probe_failed" if s is None else "ok",
                                            "warnings": tuple(w for w in r.warnings if w != P.W_NO_SCORE) + warn})
                       for r, (s, pr, warn, _) in zip(results, probed, strict=True)]
            usage += [u for *_, us in probed for u in us]
        latency = time.perf_counter() - t0
        pt, ct = _tokens(usage)
        outcome = _combine([r.outcome for r in results])
        self._c.regions_ambiguous += sum(r.outcome == "ambiguous" for r in results)
        self._record("regions", outcome, latency, pt, ct)
        results = [r.model_copy(update={"raw": comp.text, "latency_s": latency}) for r in results]
        return RegionsJudgeResult(regions=tuple(results), outcome=outcome, warnings=parsed.warnings,
                                  raw=comp.text, latency_s=latency, prompt_tokens=pt, completion_tokens=ct)

    async def complete(self, image: Any, text: str, max_tokens: int | None = None,
                       schema: dict[str, Any] | None = None, kind: RequestKind = "grounding") -> Completion:
        """A raw request (grounding), recorded as ``ok`` or its transport failure under ``kind``."""
        t0 = time.perf_counter()
        try:
            comp = await self._chat(prepare_image(image), text, max_tokens or self.cfg.max_tokens, schema)
        except JudgeError as err:
            self._record(kind, err.kind, time.perf_counter() - t0, 0, 0)
            raise
        self._record(kind, "ok", time.perf_counter() - t0, comp.prompt_tokens, comp.completion_tokens)
        return comp

    def counters(self) -> dict[str, Any]:
        """Totals: requests, outcomes, latency (sum/max/mean), tokens, transport stats."""
        c = self._c
        return {"backend": self.backend, "mode": self.mode, "requests": c.requests, **dict(c.outcomes),
                "latency_s_sum": c.latency_s_sum, "latency_s_max": c.latency_s_max,
                "latency_s_mean": c.latency_s_sum / c.requests if c.requests else 0.0,
                "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                "regions_missing": c.regions_missing, "regions_ambiguous": c.regions_ambiguous,
                "logprob_fallbacks": c.logprob_fallbacks,
                **self._transport_counters()}

    # internals -------------------------------------------------------------------------------
    def _record(self, kind: RequestKind, outcome: str, latency: float, prompt_tokens: int,
                completion_tokens: int) -> None:
        c = self._c
        c.requests += 1
        c.outcomes[outcome] = c.outcomes.get(outcome, 0) + 1
        c.latency_s_sum += latency
        c.latency_s_max = max(c.latency_s_max, latency)
        c.prompt_tokens += prompt_tokens
        c.completion_tokens += completion_tokens
        for fn in self._listeners:
            fn(kind, outcome, latency)

    async def _score_single(self, img: PreparedImage, prompt: str, builder: Any, kind: RequestKind) -> JudgeResult:
        t0 = time.perf_counter()
        try:
            if self.mode == "logprob":
                score, probs, warn, usage = await self._expected(img, builder(prompt), "Score: ")
                res = JudgeResult(score=score, probs=None if score is None else tuple(probs), warnings=warn,
                                  outcome="probe_failed" if score is None else "ok")
            elif self.mode == "structured":
                comp = await self._chat(img, builder(prompt, structured=True), self.cfg.max_tokens,
                                        Q.global_json_schema())
                res, usage = _from_parse(P.parse_score_json(comp.text), raw=comp.text), [comp]
            else:
                comp = await self._chat(img, builder(prompt), self.cfg.max_tokens)
                res, usage = _from_parse(P.parse_score_text(comp.text), raw=comp.text), [comp]
        except JudgeError as err:
            self._record(kind, err.kind, time.perf_counter() - t0, 0, 0)
            raise
        latency = time.perf_counter() - t0
        pt, ct = _tokens(usage)
        self._record(kind, res.outcome, latency, pt, ct)
        return res.model_copy(update={"latency_s": latency, "prompt_tokens": pt, "completion_tokens": ct})

    async def _expected(self, img: PreparedImage, text: str,
                        prefix: str) -> tuple[float | None, list[float], tuple[str, ...], list[Completion]]:
        """Run the four probes of :data:`PROBE_TREE` concurrently; return (E[score], probs, warnings, usage).

        The score is None (:data:`W_PROBE_FAILED`) when a probe that matters gave no distribution at all:
        the first one, or one whose branch carries at least :data:`PROBE_BRANCH_MIN` of the mass. A
        uniform guess is never turned into a score."""
        outs = await asyncio.gather(*[self._next_probs(img, text, prefix + suffix, chars)
                                      for suffix, chars in PROBE_TREE])
        fallbacks = sum(fb for _, _, fb in outs)
        self._c.logprob_fallbacks += fallbacks
        dists = [p for p, _, _ in outs]
        usage = [u for _, u, _ in outs]
        warn = (W_LOGPROB_FALLBACK,) if fallbacks else ()
        if probe_failed(*dists):
            return None, [], (*warn, W_PROBE_FAILED), usage
        probs = tenths_distribution(*dists)
        return expected_score(probs), probs, warn, usage


def positional_regions_schema(schema: dict[str, Any], ids: Sequence[int]) -> dict[str, Any]:
    """Stricter form of :func:`rewards.prompts.regions_json_schema`: entry k must have ``id == ids[k]``.

    The shared schema lets every entry's ``id`` be any of the ids (JSON Schema cannot ask objects
    in an array to differ), and a weak judge then repeats id 1 for every entry (seen with the tiny
    model on vLLM: regions 2..n missing). Here the array becomes ``prefixItems`` with one item
    schema per region whose ``id`` is a ``const`` (xgrammar enforces it); the answer has the same
    JSON shape, so :func:`rewards.parse.parse_regions_json` reads it unchanged.
    """
    out = copy.deepcopy(schema)
    arr = out["properties"]["regions"]
    item = arr.pop("items")
    prefix = []
    for k in ids:
        entry = copy.deepcopy(item)
        entry["properties"]["id"] = {"const": int(k)}
        prefix.append(entry)
    arr.update({"prefixItems": prefix, "items": False, "minItems": len(prefix), "maxItems": len(prefix)})
    return out


def _region_prefix(k: int, label: str | None) -> str:
    obj = (label or "").replace("\n", " ").strip()
    return f"Region ID: {k}\nIdentified Object: {obj}\nScore: "


def _from_parse(p: P.ScoreParse, raw: str = "", label: bool = False) -> JudgeResult:
    """A parse as a result: ``parse_failed`` without a score, ``ambiguous`` (the parser's best reading
    kept; the scorer applies ``judge.on_ambiguous``) or ``ok``."""
    outcome = "parse_failed" if p.score is None else ("ambiguous" if p.ambiguous else "ok")
    return JudgeResult(score=p.score, reason=p.reason, label=p.identified_object if label else None,
                       outcome=outcome, warnings=p.warnings, raw=raw)


def _combine(outcomes: Sequence[str]) -> str:
    """Request outcome of a region list: its failure when no region scored, ambiguous if any is, else ok."""
    if outcomes and all(o in ("parse_failed", "probe_failed") for o in outcomes):
        return outcomes[0]
    return "ambiguous" if "ambiguous" in outcomes else "ok"


def _tokens(usage: Sequence[Completion]) -> tuple[int, int]:
    return sum(u.prompt_tokens for u in usage), sum(u.completion_tokens for u in usage)
