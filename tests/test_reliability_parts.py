"""The reliability parts that need no cluster: strict config values, secrets kept off disk, one storage
location, the judge-outage breaker, a data stream and an accounting that resume where they stopped, and
prompt files that cannot smuggle binary or giant prompts in."""

from __future__ import annotations

import pytest

from cluster.buffer import ReplayBuffer
from cluster.health import MIN_SAMPLES, OutageBreaker, logged_train_steps, storage_dir
from core.config_io import ConfigError, config_to_yaml, load_config
from core.prompt_sets import MAX_PROMPT_CHARS, PromptCycler, PromptRecord, PromptSourceError, load_prompts
from core.records import DropReason, SampleRecord, TrainSample


@pytest.mark.parametrize("override, message", [
    ("run.max_steps=true", "run.max_steps: must be a number, got the boolean true"),
    ("learner.grad_clip=false", "learner.grad_clip: must be a number"),
    ("learner.lr=inf", "learner.lr: Input should be a finite number"),
    ("reward.background=.nan", "reward.background: Input should be a finite number"),
    ("cluster.num_samplers=300", "cluster.num_samplers: Input should be less than or equal to 256"),
    ("run.name=../x", "run.name: must be one folder name"),
    ("run.name=/etc", "run.name: must be one folder name"),
    ("run.name=..", "run.name: must name a folder inside run.output_dir"),
])
def test_values_that_look_valid_but_are_not_fail_at_start_with_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_the_judge_api_key_never_reaches_the_disk_and_can_come_from_the_environment(monkeypatch):
    cfg = load_config(None, ["judge.backend=openai", "judge.api_key=sk-live-123"])
    assert "sk-live-123" not in config_to_yaml(cfg) and "sk-live-123" not in repr(cfg)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert cfg.judge.api_key_value() == "sk-live-123"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    assert cfg.judge.api_key_value() == "sk-from-env"  # the environment wins
    assert load_config(None, ["judge.backend=openai", "judge.api_key_env=null"]).judge.api_key_value() == "EMPTY"


def test_storage_is_resolved_once_to_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.delenv("SRUM_STORAGE", raising=False)
    assert storage_dir("/data/runs") == storage_dir("/data/runs", cwd=tmp_path)
    assert storage_dir("runs", cwd=tmp_path) == tmp_path / "runs"
    pkg = tmp_path / "ray" / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    job = storage_dir("runs", cwd=pkg)  # under `ray job submit`: not inside Ray's temporary package copy
    assert job.is_absolute() and "runtime_resources" not in job.parts and job.name == "runs"
    monkeypatch.setenv("SRUM_STORAGE", str(tmp_path / "shared"))
    assert storage_dir("runs", cwd=pkg) == tmp_path / "shared" / "runs"


def test_an_earlier_run_is_detected_from_its_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert logged_train_steps(path) == 0
    path.write_text('{"kind": "start"}\n{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n{"kind": "tr')
    assert logged_train_steps(path) == 2


def test_the_outage_breaker_pauses_probes_and_resumes():
    b = OutageBreaker(failure_rate=0.5, pause_s=5.0)
    b.observe([False] * 4 + [True] * 3, now=0.0)  # 3 of 7 failed and too few seen: no pause
    assert b.allowed_in_flight(4, now=0.0) == 4
    b.observe([True] * (MIN_SAMPLES - 1), now=1.0)
    assert b.pauses == 1 and b.allowed_in_flight(4, now=2.0) == 0 and b.paused(now=2.0)
    assert b.allowed_in_flight(4, now=6.1) == 1  # pause over: one probe batch
    b.observe([True, True, True, False], now=7.0)  # the judge is still down: a longer pause
    assert b.pauses == 2 and b.allowed_in_flight(4, now=16.0) == 0 and b.allowed_in_flight(4, now=17.2) == 1
    b.observe([False] * 4, now=18.0)  # the probe passed: full speed
    assert b.allowed_in_flight(4, now=18.0) == 4 and b.pause_s == 5.0


def test_a_restored_prompt_walk_continues_the_stream():
    recs = [PromptRecord(id=str(i), text=f"p{i}") for i in range(7)]
    full = PromptCycler(recs, seed=5)
    first, _ = full.take(10)
    rest, seeds = full.take(9)
    stopped = PromptCycler(recs, seed=5)
    stopped.take(10)
    resumed = PromptCycler(recs, seed=5)
    resumed.restore(stopped.state())  # what a checkpoint stores
    again, seeds2 = resumed.take(9)
    assert [r.id for r in again] == [r.id for r in rest] and seeds2 == seeds
    with pytest.raises(ValueError, match="prompt source changed"):
        PromptCycler(recs[:3], seed=5).restore(resumed.state())


def test_the_buffer_accounting_resumes():
    buf = ReplayBuffer(8, 4, require_refs=False)
    rec = [SampleRecord(sample_id=f"s{i}", prompt=PromptRecord(id="1", text="p")) for i in range(5)]
    buf.add([TrainSample(r, object()) for r in rec[:4]] + [TrainSample(rec[4].model_copy(
        update={"drop_reason": DropReason.JUDGE_FAILED}), None)])
    buf.sample(2, 0)
    again = ReplayBuffer(8, 4, require_refs=False)
    again.restore(buf.counters())
    s = again.stats()
    assert (s["generated"], s["trained"], s["in_buffer"]) == (5, 2, 0)
    assert s["dropped"] == {"judge_failed": 1, "released": 2} and s["invariant_ok"]


def test_prompt_files_refuse_binary_and_giant_prompts(tmp_path):
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"a red cube\nblue\x00ball\n")
    with pytest.raises(PromptSourceError, match="line 2: control character U\\+0000"):
        load_prompts(nul)
    huge = tmp_path / "huge.txt"
    huge.write_text("a" * (MAX_PROMPT_CHARS + 1) + "\n")
    with pytest.raises(PromptSourceError, match=f"at most {MAX_PROMPT_CHARS}"):
        load_prompts(huge)
