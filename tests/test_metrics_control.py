"""Metric declarations and the Metrics recorder (no-op without Ray); the run Controller (scale validation,
status, stop) and finding it through Ray."""

from __future__ import annotations

import os
import re
import time
import urllib.request

import pytest

from cluster.control import (
    MAX_ACTORS,
    Controller,
    ControllerNotFound,
    ScaleError,
    find_controller,
    get_or_create_controller,
    validate_counts,
)
from core import metrics as M
from tests.ray_cluster import local_ray


def _ray_is_up() -> bool:
    import ray

    return ray.is_initialized()


# ---------------------------------------------------------------------------------------------- metrics
def test_every_metric_is_declared_once_with_the_srum_prefix():
    names = [m.value for m in M.Metric]
    assert len(M.Metric.__members__) == len(names) == len(set(names))  # no alias: one name per metric
    assert set(names) == set(M.METRIC_SPECS) == set(M.ALL_METRICS)
    assert all(name.startswith("srum_") for name in M.ALL_METRICS)
    for spec in M.METRIC_SPECS.values():
        if spec.kind == "histogram":
            assert list(spec.boundaries) == sorted(spec.boundaries) and spec.boundaries[0] > 0


def test_every_declared_metric_is_recorded_somewhere():
    """A metric that is declared (and charted) but never recorded is an empty panel: each one must be
    recorded with its kind's method by the service's code."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = "\n".join(p.read_text() for d in ("actors", "cluster", "srum") for p in (repo / d).glob("*.py"))
    method = {"counter": "inc", "gauge": "set", "histogram": "observe"}
    for metric in M.Metric:
        call = rf"\.{method[M.METRIC_SPECS[metric].kind]}\(\s*(?:name,|Metric\.{metric.name}\b)"
        direct = re.search(rf"\.{method[M.METRIC_SPECS[metric].kind]}\(\s*Metric\.{metric.name}\b", code)
        tabled = re.search(rf"\(Metric\.{metric.name}, \"", code) and re.search(call, code)
        assert direct or tabled, f"{metric.value} is declared but never recorded"


def test_required_metrics_exist():
    # issue 5 §Metrics / DESIGN §7
    for name, kind, tags in [
        ("srum_images_generated", "counter", ("actor",)),
        ("srum_samples_scored", "counter", ("actor",)),
        ("srum_samples_trained", "counter", ()),
        ("srum_judge_requests", "counter", ("outcome", "kind")),
        ("srum_judge_latency_seconds", "histogram", ("kind",)),
        ("srum_parse_failures", "counter", ("kind",)),
        ("srum_buffer_size", "gauge", ()),
        ("srum_buffer_drops", "counter", ("reason",)),
        ("srum_learner_step_seconds", "histogram", ()),
        ("srum_learner_loss", "gauge", ()),
        ("srum_reward_global_score", "gauge", ("actor",)),
        ("srum_reward_alpha", "gauge", ("actor",)),
        ("srum_reward_mean_r", "gauge", ("actor",)),
        ("srum_policy_version", "gauge", ()),
        ("srum_version_lag", "gauge", ("actor",)),
        ("srum_weight_sync_seconds", "histogram", ("actor",)),
    ]:
        spec = M.METRIC_SPECS[name]
        assert (spec.kind, spec.tag_keys) == (kind, tags), name


def test_prometheus_names():
    assert M.prometheus_names(M.Metric.IMAGES_GENERATED) == ("ray_srum_images_generated_total",)
    assert M.prometheus_names(M.Metric.BUFFER_SIZE) == ("ray_srum_buffer_size",)
    assert M.prometheus_names(M.Metric.JUDGE_LATENCY) == (
        "ray_srum_judge_latency_seconds_bucket", "ray_srum_judge_latency_seconds_sum",
        "ray_srum_judge_latency_seconds_count")


def test_metrics_record_locally_without_ray():
    if _ray_is_up():
        pytest.skip("Ray was initialised by another test module")
    m = M.Metrics(default_tags={"actor": "sampler-0"})
    assert not m.ray_active
    m.inc(M.Metric.IMAGES_GENERATED, 4)
    m.inc(M.Metric.IMAGES_GENERATED, 2, {"actor": "sampler-1"})  # a tags dict ...
    m.inc(M.Metric.IMAGES_GENERATED, actor="sampler-1")  # ... or keywords
    m.set(M.Metric.BUFFER_SIZE, 7)  # the default "actor" tag is ignored: buffer size has no tags
    m.set(M.Metric.BUFFER_SIZE, 9)
    m.set(M.Metric.POLICY_VERSION, None)  # nothing to report yet: ignored
    m.observe(M.Metric.JUDGE_LATENCY, 0.25, kind="global")
    m.observe(M.Metric.JUDGE_LATENCY, 0.75, kind="global")
    snap = m.snapshot()
    assert snap["counters"] == {"srum_images_generated{actor=sampler-0}": 4.0,
                                "srum_images_generated{actor=sampler-1}": 3.0}
    assert snap["gauges"] == {"srum_buffer_size": 9.0}
    assert snap["histograms"] == {"srum_judge_latency_seconds{kind=global}": {"count": 2, "sum": 1.0}}
    assert m.counter_total(M.Metric.IMAGES_GENERATED) == 7.0


def test_metrics_reject_mistakes_even_without_ray():
    m = M.Metrics()
    with pytest.raises(ValueError, match="unknown metric 'srum_typo'"):
        m.inc("srum_typo")
    with pytest.raises(ValueError, match=r"is a gauge, not a histogram: record it with set\(\)"):
        m.observe(M.Metric.REWARD_ALPHA, 0.5, actor="scorer-0")
    with pytest.raises(ValueError, match=r"needs tag\(s\) \['actor'\]"):
        m.inc(M.Metric.IMAGES_GENERATED)
    with pytest.raises(ValueError, match="unknown"):
        m.set(M.Metric.BUFFER_SIZE, 1, actor="x")
    with pytest.raises(ValueError, match="only increase"):
        m.inc(M.Metric.SAMPLES_TRAINED, -1)
    assert m.snapshot() == {"counters": {}, "gauges": {}, "histograms": {}}


# ---------------------------------------------------------------------------------------------- controller
def test_scale_validation_gives_clear_errors():
    assert validate_counts(samplers=2) == {"samplers": 2}
    for bad, msg in [(0, "must be >= 1"), (-3, "must be >= 1"), (True, "integer"), (1.5, "integer"),
                     ("2", "integer"), (MAX_ACTORS + 1, f"<= {MAX_ACTORS}")]:
        with pytest.raises(ScaleError, match=f"samplers must be .*{msg}|samplers {msg}"):
            validate_counts(samplers=bad)
        with pytest.raises(ScaleError, match=f"scorers must be .*{msg}|scorers {msg}"):
            validate_counts(scorers=bad)
        with pytest.raises(ScaleError, match=f"judges must be .*{msg}|judges {msg}"):
            validate_counts(judges=bad)
    with pytest.raises(ScaleError, match="nothing to scale"):
        validate_counts()


def test_judges_scale_only_when_the_run_launches_them():
    c = Controller(samplers=1, scorers=1)
    with pytest.raises(ScaleError, match="judge.launch is unset"):
        c.scale(judges=2)
    assert "judges" not in c.get_desired()
    c.reset(1, 1, "run", judges=2)
    assert c.scale(judges=3)["judges"] == 3 and c.scale_history()[-1]["judges"] == 3


def test_controller_scale_status_and_stop():
    c = Controller(samplers=1, scorers=2)
    assert c.get_desired() == {"samplers": 1, "scorers": 2, "generation": 0, "stop": False}
    assert c.scale(samplers=3) == {"samplers": 3, "scorers": 2, "generation": 1, "stop": False}
    assert c.scale(samplers=3, scorers=2)["generation"] == 1  # no change, no new generation
    with pytest.raises(ScaleError):
        c.scale(scorers=0)
    assert c.get_desired()["scorers"] == 2  # a refused request changes nothing
    assert [h["samplers"] for h in c.scale_history()] == [3]

    assert c.get_status() == {}  # nothing published by the driver yet
    snapshot = {"step": 5, "buffer": {"in_buffer": 3}}
    c.set_status(snapshot)
    snapshot["step"] = 99  # the controller keeps its own copy
    status = c.get_status()
    assert status["step"] == 5 and status["buffer"] == {"in_buffer": 3}
    assert status["control"]["desired"]["samplers"] == 3 and status["control"]["age_s"] >= 0
    with pytest.raises(TypeError):
        c.set_status(["not", "a", "dict"])

    assert c.request_stop("user") is True and c.request_stop("again") is False
    assert c.get_desired()["stop"] is True and c.get_status()["control"]["stop_reason"] == "user"
    with pytest.raises(ScaleError, match="stopping"):
        c.scale(samplers=1)
    c.reset(2, 2, run_name="next")
    assert c.get_desired() == {"samplers": 2, "scorers": 2, "generation": 0, "stop": False}
    assert c.get_status() == {}


def test_find_controller_refuses_a_dashboard_url():
    if _ray_is_up():
        pytest.skip("Ray was initialised by another test module")
    with pytest.raises(ControllerNotFound, match="GCS"):
        find_controller("http://127.0.0.1:8265")


# ---------------------------------------------------------------------------------------------- with Ray
@pytest.fixture(scope="module")
def ray_local():
    os.environ.setdefault("RAY_metrics_report_interval_ms", "500")  # export custom metrics quickly
    with local_ray("srum-test-control", None) as ray:
        yield ray


def test_controller_actor_round_trip(ray_local):
    ray = ray_local
    ns = "srum-test-ctl"
    with pytest.raises(ControllerNotFound, match="no srum job is running"):
        find_controller(namespace=ns)
    ctl = get_or_create_controller(ns, samplers=1, scorers=1)
    assert ray.get(ctl.scale.remote(samplers=4))["samplers"] == 4
    with pytest.raises(ScaleError, match="must be >= 1"):  # the actor's error arrives with its type
        ray.get(ctl.scale.remote(scorers=0))
    with pytest.raises(RuntimeError, match="another srum job is running"):
        get_or_create_controller(ns, exclusive=True)
    same = find_controller(namespace=ns)  # what `srum scale/status` do
    ray.get(ctl.set_status.remote({"step": 1}))
    status = ray.get(same.get_status.remote())
    assert status["step"] == 1 and status["control"]["desired"]["samplers"] == 4
    # Metrics go to Ray when it is up (the no-op path is covered above).
    m = M.Metrics({"actor": "test"})
    assert m.ray_active
    m.inc(M.Metric.IMAGES_GENERATED, 2)
    m.observe(M.Metric.WEIGHT_SYNC_TIME, 0.01)
    assert m.counter_total(M.Metric.IMAGES_GENERATED) == 2.0
    ray.kill(ctl)
    deadline = time.monotonic() + 20  # the name is released asynchronously
    with pytest.raises(ControllerNotFound):
        while time.monotonic() < deadline:
            find_controller(namespace=ns, timeout_s=2)
            time.sleep(0.1)


def test_metrics_reach_the_node_export_port_under_their_prometheus_names(ray_local):
    ray = ray_local
    m = M.Metrics({"actor": "export-test"})
    m.inc(M.Metric.IMAGES_GENERATED, 3)
    m.set(M.Metric.BUFFER_SIZE, 5)
    m.observe(M.Metric.JUDGE_LATENCY, 0.2, kind="global")
    want = {n for name in (M.Metric.IMAGES_GENERATED, M.Metric.BUFFER_SIZE, M.Metric.JUDGE_LATENCY) for n in M.prometheus_names(name)}
    port = ray.nodes()[0]["MetricsExportPort"]
    seen: set[str] = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not want <= seen:
        time.sleep(0.5)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        seen = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("ray_srum_")}
    assert want <= seen, (want, seen)
    assert 'ray_srum_images_generated_total{' in text and 'actor="export-test"' in text
