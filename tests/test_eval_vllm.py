"""`srum eval` end to end on the tiny SD3 with the REAL vLLM CPU server as the VLM evaluator: base vs the EMA
of a trained checkpoint on GenEval prompts, graded 0-100 through structured output, JSON and HTML report with
the paired per-category comparison. Marked ``vllm`` (the session's server from tests/vllm_server.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.config_io import config_to_yaml, load_config
from core.records import TrainBatch
from learner.learner import Learner
from learner.policy import DiffusersPolicy
from srum.evaluate import main as eval_main
from tests.shared_data import GENEVAL, require

pytestmark = pytest.mark.vllm


def tiny_sd3_run(root: Path) -> Path:
    cfg = load_config("configs/tiny_sd3.yaml", [f"run.output_dir={root}", "run.name=r", "learner.ema_decay=0.9",
                                                "learner.lr=1e-2", "learner.warmup_steps=0"])
    learner = Learner(cfg, DiffusersPolicy.from_config(cfg.policy, seed=cfg.run.seed))
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        learner.train_step(TrainBatch(["a photo of a bench", "a photo of a cow"], torch.randn(2, 4, 32, 32, generator=g),
                                      torch.ones(2, 32, 32), torch.ones(2)))
    learner.checkpoint(root / "r" / "checkpoints")
    (root / "r" / "config.yaml").write_text(config_to_yaml(cfg))
    return root / "r"


@pytest.mark.timeout(900)
def test_srum_eval_on_tiny_sd3_with_the_vllm_evaluator(vllm_server, tmp_path):
    require(GENEVAL)
    run = tiny_sd3_run(tmp_path)
    out = tmp_path / "ev"
    rows = [json.loads(line) for line in GENEVAL.read_text().splitlines()]
    subset = tmp_path / "geneval_subset.jsonl"  # two prompts of each of two GenEval tags (the real format)
    subset.write_text("".join(json.dumps(r) + "\n" for tag in ("single_object", "two_object")
                              for r in [r for r in rows if r["tag"] == tag][:2]))
    code = eval_main([
        "--model", "base", "--model", f"ema:{run / 'checkpoints'}", "--prompts", str(subset),
        "--categories", "single_object", "two_object", "--k", "2", "--in-process", "--out", str(out),
        "judge.backend=openai", f"judge.endpoints=[{vllm_server.base_url}]", f"judge.model={vllm_server.model}",
        "judge.timeout_s=120", "eval.max_tokens=1024"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [m["label"] for m in results["models"]] == ["base", "r-ema"]
    assert results["info"]["grader"].startswith("VLMGrader (tiny-vlm, mode structured)")
    for label in ("base", "r-ema"):
        s = results["summaries"][label]
        assert s["n"] == 8 and s["failed"] == 0  # structured output: every answer is a valid grade
        assert set(s["categories"]) == {"single_object", "two_object"}
        for r in results["records"][label]:
            assert r["outcome"] == "ok" and isinstance(r["grade"], int) and 0 <= r["grade"] <= 100
            assert r["score"] == pytest.approx(r["grade"] / 100) and (out / r["image"]).is_file()
    assert results["grader_counts"] == {"ok": 16, "parse_failed": 0, "judge_error": 0}
    comp = results["comparisons"]["r-ema"]
    for cat in ("single_object", "two_object"):
        c = comp["categories"][cat]
        assert c["prompts"] == 2 and c["delta"] == pytest.approx(c["b"] - c["a"]) and len(c["ci"]) == 2
    report = (out / "report.html").read_text()
    assert "r-ema &minus; base" in report and report.count("<img") == 16 and "two_object" in report
