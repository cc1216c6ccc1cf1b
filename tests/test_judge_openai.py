"""OpenAI backend against a fake loopback server: modes, retries, 4xx, timeouts, balancing, cap."""

from __future__ import annotations

import asyncio
import base64
import io
import time

import pytest
from PIL import Image

from core.config import OpenAIJudgeConfig
from rewards.judge import (
    JudgeBadResponseError,
    JudgeHTTPError,
    JudgeModelNotFoundError,
    JudgeRequestError,
    JudgeTimeoutError,
    JudgeUnavailableError,
)
from srum.registry import make_judge
from tests.judge_fake_server import FakeOpenAIServer, _free_port

IMG = Image.new("RGB", (32, 24), (10, 200, 30))


@pytest.fixture
def server():
    srv = FakeOpenAIServer().start()
    yield srv
    srv.close()


def judge_for(*urls: str, **kw):
    cfg = {"backend": "openai", "endpoints": list(urls), "max_retries": 2, "backoff_s": 0.01, "timeout_s": 5.0,
           "max_tokens": 64, **kw}
    return make_judge(OpenAIJudgeConfig(**cfg))


def run(coro, judge=None):
    """asyncio.run that closes the judge's clients inside the same loop (no stray loop warnings)."""

    async def main():
        try:
            return await coro
        finally:
            if judge is not None:
                await judge.aclose()

    return asyncio.run(main())


def test_text_mode_request_and_parse(server):
    server.answer = lambda body: "Score: 0.7\nReason: the cat is left of the dog."
    j = judge_for(server.base_url, mode="text")
    res = run(j.score_global(IMG, "a cat left of a dog"), j)
    assert res.score == pytest.approx(0.7) and res.outcome == "ok"
    assert res.reason.startswith("the cat") and res.prompt_tokens == 11 and res.completion_tokens == 3
    body = server.requests[-1]
    assert body["model"] == "tiny-vlm" and body["temperature"] == 0.0 and body["max_tokens"] == 64
    parts = body["messages"][0]["content"]
    url = parts[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (32, 24)
    assert "a cat left of a dog" in parts[1]["text"]
    c = j.counters()
    assert c["requests"] == 1 and c["ok"] == 1 and c["attempts"] == 1 and c["prompt_tokens"] == 11


def test_text_parse_failure_and_ambiguous_answers_are_counted(server):
    answers = iter(["I cannot tell.", "Score: 3\nReason: great"])
    server.answer = lambda body: next(answers)
    j = judge_for(server.base_url, mode="text")
    bad = run(j.score_global(IMG, "p"), j)
    other_scale = run(j.score_sample(IMG, "p"), j)
    assert bad.score is None and bad.outcome == "parse_failed"
    # "3" on a [-1, 1] prompt: read as 3 tenths, never silently clamped to the maximum; flagged for the scorer
    assert other_scale.score == pytest.approx(0.3) and other_scale.outcome == "ambiguous"
    assert "other_scale" in other_scale.warnings
    c = j.counters()
    assert (c["parse_failed"], c["ambiguous"], c["ok"]) == (1, 1, 0) and "clamped" not in c


def test_structured_mode_sends_json_schema(server):
    server.answer = lambda body: '{"score":-4,"reason":"wrong side"}'
    j = judge_for(server.base_url, mode="structured")
    res = run(j.score_global(IMG, "p"), j)
    assert res.score == pytest.approx(-0.4) and res.reason == "wrong side"
    body = server.requests[-1]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["properties"]["score"]["maximum"] == 10
    assert "guided_json" not in body


def test_structured_regions_positional_schema(server):
    server.answer = lambda body: ('{"regions":[{"id":1,"object":"cat","score":9,"reason":"a"},'
                                  '{"id":2,"object":"tree","score":-3,"reason":"b"}]}')
    j = judge_for(server.base_url, mode="structured")
    res = run(j.score_regions(IMG, "a cat", [(0, 0, 10, 10), (5, 5, 20, 20)]), j)
    assert [r.score for r in res.regions] == [pytest.approx(0.9), pytest.approx(-0.3)]
    assert [r.label for r in res.regions] == ["cat", "tree"] and res.outcome == "ok"
    arr = server.requests[-1]["response_format"]["json_schema"]["schema"]["properties"]["regions"]
    assert [it["properties"]["id"] for it in arr["prefixItems"]] == [{"const": 1}, {"const": 2}]
    assert arr["items"] is False
    assert len(server.requests) == 1  # one request for the whole region list


def test_text_regions_missing_region_counted(server):
    server.answer = lambda body: "Region ID: 1\nIdentified Object: cat\nScore: 0.6\nReason: ok\n---\n"
    j = judge_for(server.base_url, mode="text")
    res = run(j.score_regions(IMG, "a cat", [(0, 0, 10, 10), (5, 5, 20, 20)]), j)
    assert res.regions[0].score == pytest.approx(0.6) and res.regions[1].score is None
    assert res.outcome == "ok" and j.counters()["regions_missing"] == 1


def test_logprob_mode_expected_score_by_hand(server):
    def probe(body):
        prefix = body["messages"][-1]["content"]
        return {"Score: ": {"-": 0.5, "0": 0.5}, "Score: -": {"1": 1.0}, "Score: 0.": {"5": 1.0},
                "Score: -0.": {"3": 1.0}}[prefix]

    server.probe = probe
    j = judge_for(server.base_url, mode="logprob")
    res = run(j.score_global(IMG, "p"), j)
    # 0.5 * (-1.0) + 0.5 * 0.5 = -0.25
    assert res.score == pytest.approx(-0.25) and res.outcome == "ok"
    assert res.probs[0] == pytest.approx(0.5) and res.probs[15] == pytest.approx(0.5)
    bodies = server.requests[-4:]
    assert {b["messages"][-1]["content"] for b in bodies} == {"Score: ", "Score: -", "Score: 0.", "Score: -0."}
    for b in bodies:
        assert b["continue_final_message"] is True and b["add_generation_prompt"] is False
        assert b["max_tokens"] == 1 and b["logprobs"] is True and b["messages"][-1]["role"] == "assistant"
    assert sorted(bodies[0]["structured_outputs"]["choice"]) == ["-", "0", "1"]


def test_logprob_regions_use_identified_object(server):
    server.answer = lambda body: "Region ID: 1\nIdentified Object: a cat\nScore: 0.2\nReason: r\n---"
    server.probe = lambda body: {"1": 1.0} if body["messages"][-1]["content"].endswith("Score: ") else {"0": 1.0}
    j = judge_for(server.base_url, mode="logprob")
    res = run(j.score_regions(IMG, "a cat", [(0, 0, 10, 10)]), j)
    assert res.regions[0].score == pytest.approx(1.0) and res.regions[0].label == "a cat"
    prefixes = [b["messages"][-1]["content"] for b in server.requests if b.get("logprobs")]
    assert "Region ID: 1\nIdentified Object: a cat\nScore: " in prefixes


def test_retries_5xx_then_succeeds(server):
    server.script = [503, 500]
    j = judge_for(server.base_url, mode="text")
    res = run(j.score_global(IMG, "p"), j)
    c = j.counters()
    assert res.score == 0.5 and c["attempts"] == 3 and c["retries"] == 2
    assert c["attempt_errors"] == {"5xx": 2} and c["ok"] == 1


def test_429_retried_with_retry_after(server):
    server.script = [("status", 429, {"Retry-After": "0.3"})]
    j = judge_for(server.base_url, mode="text")
    t0 = time.perf_counter()
    res = run(j.score_global(IMG, "p"), j)
    assert res.score == 0.5 and time.perf_counter() - t0 >= 0.3
    assert j.counters()["attempt_errors"] == {"429": 1}


def test_5xx_exhausted_raises_and_counts(server):
    server.script = [502, 502, 502]
    j = judge_for(server.base_url, mode="text")
    with pytest.raises(JudgeHTTPError, match="HTTP 502"):
        run(j.score_global(IMG, "p"), j)
    c = j.counters()
    assert c["attempts"] == 3 and c["http_error"] == 1 and c["requests"] == 1


def test_400_not_retried(server):
    server.script = [400]
    j = judge_for(server.base_url, mode="text")
    with pytest.raises(JudgeRequestError, match="HTTP 400.*not retried"):
        run(j.score_global(IMG, "p"), j)
    assert j.counters()["attempts"] == 1 and len(server.requests) == 1


def test_wrong_model_lists_served_models(server):
    j = judge_for(server.base_url, mode="text", model="nope", health_check=False)
    with pytest.raises(JudgeModelNotFoundError, match=r"'nope'.*served models: \['tiny-vlm'\]"):
        run(j.score_global(IMG, "p"), j)
    assert len(server.requests) == 1 and j.counters()["retries"] == 0


def test_health_check_wrong_model_fails_fast(server):
    j = judge_for(server.base_url, model="nope")
    with pytest.raises(JudgeModelNotFoundError, match="served models"):
        run(j.check_health(), j)
    assert server.requests == []


def test_a_200_that_is_no_completion_is_retried_then_a_counted_judge_error(server):
    server.answer = lambda body: "Score: 0.5\nReason: fine"
    server.script = [("body", "<html><body>502 from the proxy</body></html>")]
    j = judge_for(server.base_url, mode="text")
    res = run(j.score_global(IMG, "p"), j)  # retried like a 5xx, then the real answer
    assert res.score == 0.5 and j.counters()["attempt_errors"] == {"bad_response": 1}
    server.script = [("body", '{"choices": [', "application/json"), ("body", '{"id": 1}', "application/json"),
                     ("body", "[1, 2]", "application/json")]
    j = judge_for(server.base_url, mode="text")
    with pytest.raises(JudgeBadResponseError, match="not"):
        run(j.score_global(IMG, "p"), j)
    c = j.counters()
    assert c["bad_response"] == 1 and c["attempt_errors"] == {"bad_response": 3} and c["requests"] == 1


def test_logprob_probe_without_a_distribution_is_a_failure_not_a_guess(server):
    server.probe = lambda body: {}  # no allowed token in the top logprobs (and the fake chooses the first)
    j = judge_for(server.base_url, mode="logprob")
    res = run(j.score_global(IMG, "p"), j)
    assert res.score is not None and "logprob_fallback" in res.warnings  # the chosen token is still information

    server.probe = lambda body: {"__raw__": [("x", -0.1)]}  # nothing allowed, not even the chosen token
    j = judge_for(server.base_url, mode="logprob")
    res = run(j.score_global(IMG, "p"), j)
    assert res.score is None and res.outcome == "probe_failed" and res.probs is None
    assert j.counters()["probe_failed"] == 1


def test_absurd_logprobs_do_not_overflow_or_count(server):
    # a positive log-probability beyond exp's range is no probability: skipped, the other tokens decide
    server.probe = lambda body: {"__raw__": [("1", 800.0), ("0", -0.01), ("-", -5.0), ("5", 0.0)]}
    j = judge_for(server.base_url, mode="logprob")
    res = run(j.score_global(IMG, "p"), j)
    assert res.outcome == "ok" and res.probs[20] == pytest.approx(0.0)  # P(score = 1.0) from the 800 entry: none
    assert -1.0 <= res.score <= 1.0


def test_server_down_at_start_names_url():
    url = f"http://127.0.0.1:{_free_port()}/v1"
    j = judge_for(url)
    with pytest.raises(JudgeUnavailableError, match=url.replace(".", r"\.")):
        run(j.score_global(IMG, "p"), j)  # the lazy health check runs before the first request
    with pytest.raises(JudgeUnavailableError, match="is not healthy"):
        run(j.check_health(), j)


def test_timeout_retried_then_raises(server):
    server.script = [("delay", 1.0), ("delay", 1.0)]
    j = judge_for(server.base_url, mode="text", timeout_s=0.2, max_retries=1)
    with pytest.raises(JudgeTimeoutError, match="timed out"):
        run(j.score_global(IMG, "p"), j)
    c = j.counters()
    assert c["timeout"] == 1 and c["attempts"] == 2 and c["attempt_errors"] == {"timeout": 2}


def test_killed_mid_run_counts_failures_then_recovers(server):
    j = judge_for(server.base_url, mode="text", max_retries=1)

    async def scenario():
        first = await j.score_global(IMG, "p")
        server.stop()
        failures = 0
        for _ in range(3):
            try:
                await j.score_global(IMG, "p")
            except JudgeHTTPError:
                failures += 1
        server.start()
        again = await j.score_global(IMG, "p")
        return first, failures, again

    first, failures, again = run(scenario(), j)
    c = j.counters()
    assert first.score == 0.5 and again.score == 0.5 and failures == 3
    assert c["http_error"] == 3 and c["ok"] == 2 and c["attempt_errors"]["connection"] == 6


def test_least_in_flight_balancing_and_failover():
    a, b = FakeOpenAIServer(latency_s=0.05).start(), FakeOpenAIServer(latency_s=0.05).start()
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    try:
        j = judge_for(a.base_url, b.base_url, mode="text")

        async def many(judge, n):
            return await asyncio.gather(*[judge.score_global(IMG, "p") for _ in range(n)])

        res = run(many(j, 20), j)
        assert all(r.score == 0.5 for r in res)
        assert len(a.requests) + len(b.requests) == 20 and abs(len(a.requests) - len(b.requests)) <= 2
        before = len(a.requests)
        j2 = judge_for(a.base_url, dead, mode="text", health_check=False)
        res = run(many(j2, 6), j2)
        assert all(r.score == 0.5 for r in res) and len(a.requests) - before == 6
        assert j2.counters()["endpoints"][dead]["errors"]["connection"] >= 1
    finally:
        a.close()
        b.close()


def test_in_flight_cap_is_backpressure():
    srv = FakeOpenAIServer(latency_s=0.05).start()
    try:
        j = judge_for(srv.base_url, mode="text", max_in_flight_per_endpoint=3)

        async def many():
            return await asyncio.gather(*[j.score_global(IMG, "p") for _ in range(12)])

        t0 = time.perf_counter()
        res = run(many(), j)
        wall = time.perf_counter() - t0
        assert len(res) == 12 and srv.max_in_flight == 3
        assert wall >= 4 * 0.05 and j.counters()["pool_waits"] > 0
    finally:
        srv.close()


def test_survives_successive_event_loops(server):
    j = judge_for(server.base_url, mode="text")
    assert run(j.score_global(IMG, "p")).score == 0.5
    assert run(j.score_global(IMG, "p")).score == 0.5
    run(j.aclose())


def test_regions_missing_from_the_answer_are_counted_in_logprob_mode_too(server):
    server.answer = lambda body: "Region ID: 1\nIdentified Object: a cat\nScore: 0.2\nReason: r"  # no region 2
    server.probe = lambda body: {"0": 1.0}
    j = judge_for(server.base_url, mode="logprob")
    res = run(j.score_regions(IMG, "a cat", [(0, 0, 10, 10), (10, 10, 20, 20)]), j)
    assert [r.score is not None for r in res.regions] == [True, True]  # both probed
    assert j.counters()["regions_missing"] == 1  # but the answer lacked region 2, and that is counted


def test_on_ambiguous_reaches_the_scorer_from_the_config():
    from core.config_io import load_config
    from srum.registry import compose

    for policy in ("drop", "neutral", "use"):
        cfg = load_config("configs/tiny_sd3.yaml", [f"judge.on_ambiguous={policy}"])
        assert compose(cfg).scorer().on_ambiguous == policy
    assert load_config(None).judge.on_ambiguous == "drop"
