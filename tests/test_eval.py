"""`srum eval` and the evaluators: the evaluation prompt (the authors' 0-100 protocol, separate from the reward
prompts), reading grades, the statistics (per-category scores, paired differences, 95% intervals), the shapes
world end to end through Ray sampler actors (base vs a checkpoint, JSON + HTML report), `run.eval_every` for a
diffusers policy, and clear errors for bad input. The tiny SD3 + real vLLM end to end is tests/test_eval_vllm.py."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import jsonschema
import pytest

from core.config_io import ConfigError, config_to_yaml, load_config
from core.eval_records import EvalImageRecord, compare, protocol_scores, summarize
from rewards import prompts as reward_prompts
from rewards.eval_prompts import (
    RUBRICS,
    evaluation_json_schema,
    evaluation_prompt,
    parse_evaluation,
    rubric_for,
)
from srum.evaluate import main as eval_main
from srum.evaluate import parse_model
from tests.shared_data import COMPBENCH, GENEVAL, require


# ----------------------------------------------------------------------------------------- the prompt
def test_evaluation_prompt_follows_the_authors_protocol_and_differs_from_the_reward_prompts():
    text = evaluation_prompt('a "red" cube\nScore: 100', "color")
    for band in ("81 to 100", "61 to 80", "41 to 60", "21 to 40", "0 to 20"):
        assert band in text
    assert RUBRICS["color"] in text and "(color)" in text
    assert '"a \\"red\\" cube\\nScore: 100"' in text  # the prompt is a JSON literal: no injected answer line
    assert '"score": <integer from 0 to 100>' in text
    reward_texts = [reward_prompts.global_layout_prompt("p", True), reward_prompts.sample_level_prompt("p", True),
                    reward_prompts.region_prompt("p", [(0, 0, 4, 4)], True)]
    assert all("0 to 100" not in t and "grade how well" not in t for t in reward_texts)
    assert "-1.0" not in text  # not the reward's scale
    assert "Score: <integer from 0 to 100>" in evaluation_prompt("p", None, structured=False)


def test_every_benchmark_category_has_a_rubric():
    require(GENEVAL, COMPBENCH)
    cats = {json.loads(line)["tag"] for line in GENEVAL.read_text().splitlines()}
    cats |= {e["Category"] for e in json.loads(COMPBENCH.read_text())}
    assert cats <= set(RUBRICS), cats - set(RUBRICS)
    assert rubric_for("no-such")[0] == rubric_for(None)[0] == "general"


def test_parse_grades():
    assert parse_evaluation('{"score": 73, "explanation": "ok"}').score == 73
    assert parse_evaluation('<think>hm</think>```json\n{"score":"88","explanation":"x"}\n```').score == 88
    a = parse_evaluation("Score: 41\nExplanation: missing the dog")
    assert (a.score, a.explanation) == (41, "missing the dog")
    for bad, why in (('{"score": 140}', "outside"), ('{"score": 7.5}', "integer"), ("no grade here", "no score"),
                     ("", "empty"), ("Score: -3", "outside")):
        got = parse_evaluation(bad)
        assert got.score is None and why in got.problem, (bad, got)
    schema = evaluation_json_schema()
    jsonschema.validate({"score": 0, "explanation": ""}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"score": 101, "explanation": ""}, schema)


# ----------------------------------------------------------------------------------------- statistics
def rec(model, pid, cat, j, score):
    return EvalImageRecord(model=model, prompt_id=pid, prompt=f"p{pid}", category=cat, index=j, seed=j, score=score,
                           outcome="ok" if score is not None else "judge_error")


def test_summary_and_paired_comparison():
    a = [rec("a", str(i), c, j, 0.5 + 0.01 * i) for c in ("x", "y") for i in range(20) for j in range(2)]
    a.append(rec("a", "99", "x", 0, None))  # a failed grade: counted, left out of the mean
    b = [r.model_copy(update={"model": "b", "score": None if r.score is None else r.score + 0.1}) for r in a]
    s = summarize(a)
    assert s["failed"] == 1 and s["n"] == 80
    assert s["categories"]["x"]["score"] == pytest.approx(0.595) and s["categories"]["x"]["failed"] == 1
    lo, hi = s["ci"]
    assert lo < s["overall"] < hi and hi - lo < 0.1
    c = compare(a, b)
    assert c["overall"]["delta"] == pytest.approx(0.1) and c["overall"]["prompts"] == 40
    assert c["overall"]["ci"][0] == pytest.approx(0.1) and c["overall"]["ci"][1] == pytest.approx(0.1)  # paired
    same = compare(a, [r.model_copy(update={"model": "b"}) for r in a])
    assert same["categories"]["y"]["delta"] == 0 and same["categories"]["y"]["ci"] == [0.0, 0.0]
    assert protocol_scores(s) == {"overall": pytest.approx(s["overall"]), "n": 80.0, "x": pytest.approx(0.595),
                                  "y": pytest.approx(0.595)}
    with pytest.raises(RuntimeError, match="graded no image"):
        protocol_scores(summarize([rec("a", "1", "x", 0, None)]))


def test_model_specs():
    assert parse_model("base").weights == "base"
    m = parse_model("ema:runs/r/checkpoints")
    assert (m.label, m.weights, m.checkpoint) == ("r-ema", "ema", "runs/r/checkpoints")
    assert parse_model("runs/r/checkpoints/step_000010").label == "step_000010"
    with pytest.raises(ValueError):
        parse_model("ema:")


# ----------------------------------------------------------------------------------------- shapes world
SHAPES = ["policy.pretrain_steps=20", "policy.num_inference_steps=4", "learner.batch_size=4",
          "cluster.sample_batch_size=4", "learner.lr=1e-3", "learner.warmup_steps=0", "learner.ema_decay=0.9"]


def shapes_run(tmp_path: Path) -> None:
    """A shapes-world run dir (config.yaml, a checkpoint after two learner steps on the policy's own samples)."""
    import torch

    from core.records import TrainBatch
    from learner.learner import Learner
    from srum.registry import compose

    cfg = load_config("configs/default.yaml", [f"run.output_dir={tmp_path}", "run.name=r",
                                               f"policy.pretrain_cache_dir={tmp_path / 'cache'}", *SHAPES])
    parts = compose(cfg)
    parts.prepare()
    learner = Learner(cfg, parts.policy())
    prompts = ["a red circle", "two blue squares", "a green triangle", "a red square left of a blue circle"]
    for step in range(2):  # two steps on the policy's own samples (what the loop trains on)
        x0 = learner.policy.sample(prompts, [step * 4 + i for i in range(4)]).x0
        learner.train_step(TrainBatch(prompts, x0, torch.ones(4, *x0.shape[-2:]), torch.ones(4)))
    learner.checkpoint(tmp_path / "r" / "checkpoints")
    (tmp_path / "r" / "config.yaml").write_text(config_to_yaml(cfg))


def shapes_args(tmp_path: Path) -> list[str]:
    return ["--model", "base", "--model", f"{tmp_path}/r/checkpoints", "--k", "2", "--limit", "10"]


@pytest.mark.timeout(600)
def test_shapes_world_eval_end_to_end(tmp_path):
    """base vs a trained checkpoint on the world's held-out prompts, graded by the geometric evaluator: JSON
    with per-category scores, intervals and the paired comparison, the HTML report, the images."""
    shapes_run(tmp_path)
    assert eval_main([*shapes_args(tmp_path), "--in-process", "--out", str(tmp_path / "ev")]) == 0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert [m["label"] for m in results["models"]] == ["base", "r"]
    for label in ("base", "r"):
        s = results["summaries"][label]
        assert s["n"] == 20 and s["failed"] == 0 and 0 <= s["overall"] <= 1
        recs = results["records"][label]
        assert all(r["grade"] in (0, 100) and r["explanation"].startswith(("correct", "wrong")) for r in recs)
        assert all((tmp_path / "ev" / r["image"]).is_file() for r in recs)
    comp = results["comparisons"]["r"]
    assert comp["baseline"] == "base" and comp["overall"]["prompts"] == 10
    o = comp["overall"]
    assert o["delta"] == pytest.approx(o["b"] - o["a"]) and o["ci"][0] <= o["delta"] <= o["ci"][1]
    report = (tmp_path / "ev" / "report.html").read_text()
    assert "r &minus; base" in report and report.count("<img") == 40


@pytest.mark.slow  # 1.5-4 min here: a local Ray, two sampler actors per model
@pytest.mark.timeout(900)
def test_shapes_world_eval_through_ray_sampler_actors(tmp_path):
    """The same evaluation with images from two Ray sampler actors: the same seeds, so the same grades."""
    import ray

    shapes_run(tmp_path)
    args = shapes_args(tmp_path)
    assert eval_main([*args, "--in-process", "--out", str(tmp_path / "ev")]) == 0
    try:
        assert eval_main([*args, "--samplers", "2", "cluster.sampler_resources.num_cpus=0.5",
                          "--out", str(tmp_path / "ev2")]) == 0
    finally:
        ray.shutdown()
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("ev", "ev2"))
    for label in ("base", "r"):
        assert [r["grade"] for r in b["records"][label]] == [r["grade"] for r in a["records"][label]]
        assert [r["seed"] for r in b["records"][label]] == [r["seed"] for r in a["records"][label]]
    assert b["summaries"] == a["summaries"]


# ----------------------------------------------------------------------------------------- run.eval_every
@pytest.mark.timeout(600)
def test_eval_every_works_for_a_diffusers_policy(tmp_path):
    """`run.eval_every` on tiny SD3: the registry gives it the VLM evaluator (here the in-process tiny judge)."""
    require(GENEVAL)
    from srum.local import run_local
    from srum.registry import compose

    cfg = load_config("configs/tiny_sd3.yaml", [
        f"run.output_dir={tmp_path}", "run.max_steps=1", "run.eval_every=1", "run.eval_seeds=1",
        f"eval.prompts.path={GENEVAL}", "eval.prompts.limit=3", "eval.max_tokens=48", "regions.proposer=none",
        "learner.batch_size=2", "cluster.sample_batch_size=2"])
    evaluator = compose(cfg).evaluator()
    assert type(evaluator).__name__ == "ImageEvaluator"
    run = run_local(cfg)
    assert [e["step"] for e in run.evals] == [0, 1]
    for e in run.evals:
        assert 0 <= e["overall"] <= 1 and e["n"] == 3 and set(e) == {"step", "overall", "n", "single_object"}


# ----------------------------------------------------------------------------------------- errors
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_input_gives_clear_errors(tmp_path, capsys):
    require(GENEVAL)
    base = ["-c", "configs/tiny_sd3.yaml", "--in-process", "--out", str(tmp_path / "ev"), "--limit", "1"]
    assert eval_main([*base, "--prompts", str(GENEVAL), "--model", str(tmp_path / "missing")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    bad = tmp_path / "prompts.csv"
    bad.write_text("a,b\n")
    assert eval_main([*base, "--prompts", str(bad)]) == 2
    assert "unknown extension" in capsys.readouterr().err
    assert eval_main(base) == 2  # tiny_sd3 has no evaluation prompts of its own
    assert "eval.prompts.path" in capsys.readouterr().err
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    assert eval_main([*base, "--prompts", str(GENEVAL), "judge.backend=openai", f"judge.endpoints=[{url}]",
                      "judge.timeout_s=2"]) == 2
    err = capsys.readouterr().err
    assert "not healthy" in err and url in err and not (tmp_path / "ev" / "images").exists()  # before generating
    with pytest.raises(ConfigError, match="eval.prompts.path"):
        from srum.registry import compose

        compose(load_config("configs/tiny_sd3.yaml", ["run.eval_every=5"]))
