"""The driver's small parts without a cluster: prompt cycling, progress line, metrics.jsonl, plots, the
gallery, the entrypoint's exit codes and the CLI's config commands; and the judge-server launcher
against a real subprocess on loopback."""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest

from cluster.progress import (
    Gallery,
    ProgressReporter,
    draw_boxes,
    format_progress,
    plot_metrics,
    read_metrics,
    unreadable_judge_warning,
)
from core.prompt_sets import PromptCycler, PromptRecord
from core.records import DropReason, Region, SampleRecord
from srum import cli
from srum import main as entry


def records(n: int) -> list[PromptRecord]:
    return [PromptRecord(id=str(i), text=f"prompt {i}") for i in range(n)]


def test_prompt_cycler_covers_every_prompt_each_epoch_with_unique_seeds():
    cyc = PromptCycler(records(5), seed=3)
    first, seeds1 = cyc.take(5)
    second, seeds2 = cyc.take(5)
    assert sorted(p.id for p in first) == sorted(p.id for p in second) == [str(i) for i in range(5)]
    assert len(set(seeds1 + seeds2)) == 10  # a new seed for every image
    again = PromptCycler(records(5), seed=3)
    assert [p.id for p in again.take(5)[0]] == [p.id for p in first]  # deterministic per seed
    odd, _ = PromptCycler(records(3), seed=0, shuffle=False).take(7)
    assert [p.id for p in odd] == ["0", "1", "2", "0", "1", "2", "0"]


def test_progress_line_and_metrics_jsonl(tmp_path):
    line = format_progress({"step": 3, "max_steps": 10, "images_per_s": 2.5, "trained_per_s": 1.25,
                            "mean_global_score": -0.5, "loss": 0.1234, "buffer_size": 7, "policy_version": 3,
                            "max_lag": 1, "judge_failed": 2, "judge_unread": 5, "num_samplers": 2, "num_scorers": 1})
    assert "step 3/10" in line and "img/s 2.50" in line and "g -0.50" in line and "lag 1" in line
    assert "judge fail 2 unread 5" in line and "samplers 2 scorers 1" in line
    assert "g -" in format_progress({"step": 0, "mean_global_score": None})

    out = io.StringIO()
    rep = ProgressReporter(tmp_path, stream=out, min_interval_s=0.0)
    assert rep.show({"step": 1, "max_steps": 2, "images_per_s": 1.0})
    # nothing it tracks changed (only a rate): not printed again, unless forced
    assert not rep.show({"step": 1, "max_steps": 2, "images_per_s": 0.5})
    assert rep.show({"step": 1, "max_steps": 2, "images_per_s": 0.5, "judge_failed": 1})
    assert rep.show({"step": 1, "max_steps": 2, "judge_failed": 1}, force=True)
    assert out.getvalue().count("step 1/2") == 3
    rep.log({"kind": "train", "step": 1, "loss": 0.5})
    rep.log({"kind": "train", "step": 2, "loss": 0.25, "l_r": 0.1, "mean_global_score": 0.3, "mean_alpha": 0.6})
    with rep.metrics_path.open("a") as f:
        f.write('{"kind": "train", "step": 3, "lo')  # a torn last line (crash mid-write) is skipped
    assert "step 1/2" in out.getvalue()
    rows = read_metrics(rep.metrics_path)
    assert [r["step"] for r in rows] == [1, 2] and all("time" in r for r in rows)
    png = plot_metrics(rep.metrics_path, tmp_path / "curves.png")
    assert png is not None and png.stat().st_size > 1000
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_metrics(tmp_path / "empty.jsonl", tmp_path / "none.png") is None


def test_a_judge_whose_answers_cannot_be_read_is_reported():
    def stats(generated: int, unread: int) -> dict:
        return {"generated": generated, "dropped": {DropReason.NO_GLOBAL_SCORE.value: unread}}

    msg = unreadable_judge_warning(stats(100, 95), "text")
    assert msg is not None and "95 of the 100 samples" in msg and "judge.mode=text" in msg
    assert unreadable_judge_warning(stats(100, 80), "text") is None  # some answers are read: training goes on
    assert unreadable_judge_warning(stats(40, 40), "text") is None  # too few judged to tell


def test_gallery_draws_boxes_and_heatmap(tmp_path):
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    regions = [Region(box=(8, 8, 32, 32), score=0.8, label="cube", reason="good <b>" + "x" * 300),
               Region(box=(40, 40, 60, 60), score=-0.6, label="ball", reason="bad"),
               Region(box=(float("nan"), 0, 1, 1), score=0.1)]
    boxed = np.asarray(draw_boxes(img, regions))
    assert boxed.shape == (256, 256, 3)  # small images are enlarged for viewing
    assert (boxed[32, 40:120] == (0, 170, 0)).all()  # positive box: green top edge at y = 8 * 4
    assert (boxed[160, 170:230] == (220, 0, 0)).all()  # negative box: red top edge at y = 40 * 4
    halved = np.asarray(draw_boxes(img[::2, ::2], regions, box_scale=0.5))  # a shrunk preview, full-size boxes
    assert (halved[32, 40:120] == (0, 170, 0)).all()
    gal = Gallery(tmp_path, keep=2)
    R = np.full((64, 64), 0.5, dtype=np.float32)
    for i in range(3):
        rec = SampleRecord(sample_id=f"s{i}", prompt=PromptRecord(id=str(i), text=f"p{i} & <x>"), policy_version=i,
                           global_score=0.5, alpha=0.75, regions=regions,
                           drop_reason=DropReason.GLOBAL_SCORE_ZERO if i == 2 else None)
        gal.add(img, rec, R)
    html = gal.write().read_text()
    assert html.count("class='c'") == 2 and "p0" not in html  # keeps the most recent
    assert "p2 &amp; &lt;x&gt;" in html and "dropped" in html and "global_score_zero" in html
    reason_cell = html.split("good &lt;b&gt;")[1].split("</td>")[0]
    assert set(reason_cell) == {"x"} and len(reason_cell) == 160 - len("good <b>")  # cut before escaping
    assert html.count("data:image/png;base64,") == 4  # boxes + heat-map per card


def test_entrypoint_exit_codes_on_bad_config_and_prompts(tmp_path, capsys):
    assert entry.main(["learner.lambda_c=-1"]) == 2
    assert "learner.lambda_c" in capsys.readouterr().err
    assert entry.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    assert entry.main([f"cluster.prompts.path={empty}", f"run.output_dir={tmp_path}"]) == 2
    assert "empty.txt" in capsys.readouterr().err


def test_cli_config_list_and_resolve(capsys):
    assert cli.main(["config", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "learner.lambda_c" in listing and "cluster.num_samplers" in listing
    assert cli.main(["config", "-c", "configs/default.yaml", "--list"]) == 0
    shapes = capsys.readouterr().out  # a shapes run lists its own sections' fields, no SAM thresholds
    assert "policy.pretrain_steps" in shapes and "pred_iou_thresh" not in shapes
    assert cli.main(["config", "--list", "--all"]) == 0
    assert "[regions (proposer='sam')]" in capsys.readouterr().out
    assert cli.main(["config", "-c", "configs/default.yaml", "learner.lambda_c=0.25"]) == 0
    assert "lambda_c: 0.25" in capsys.readouterr().out
    assert cli.main(["config", "learner.nope=1"]) == 2
    assert "learner.nope" in capsys.readouterr().err
    assert cli.main(["scale"]) == 2  # neither --samplers nor --scorers


SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_judge_server_launcher_starts_waits_restarts_and_stops(tmp_path):
    from actors.judge_server import JudgeServerError, JudgeServerLauncher
    from tests.ray_cluster import free_port

    port = free_port()
    launcher = JudgeServerLauncher([sys.executable, "-c", SERVER, str(port)], port=port, host="127.0.0.1",
                                   ready_timeout_s=30, monitor_interval_s=0.2, log_path=str(tmp_path / "srv.log"))
    try:
        assert launcher.start() == f"http://127.0.0.1:{port}/v1"
        assert launcher.health()
        first = launcher.proc.pid
        os.killpg(first, signal.SIGKILL)  # the server dies: the monitor restarts it
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (launcher.restarts == 1 and launcher.health()):
            time.sleep(0.1)
        assert launcher.restarts == 1 and launcher.health() and launcher.proc.pid != first
    finally:
        info = launcher.stop()
    assert info["alive"] is False and not launcher.health()

    # started from a short-lived thread (as the vLLM tests restart it through asyncio.to_thread): the server
    # must outlive that thread (the parent-death signal is tied to the spawning thread, so it is not set there)
    port = free_port()
    again = JudgeServerLauncher([sys.executable, "-c", SERVER, str(port)], port=port, host="127.0.0.1",
                                ready_timeout_s=30, max_restarts=0)
    try:
        worker = threading.Thread(target=again.start)
        worker.start()
        worker.join()
        time.sleep(1.0)
        assert again.health() and again.proc.poll() is None
    finally:
        again.stop()

    bad = JudgeServerLauncher([sys.executable, "-c", "import sys; sys.exit(3)"], port=free_port(),
                              host="127.0.0.1", ready_timeout_s=10)
    with pytest.raises(JudgeServerError, match="exited with code 3"):
        bad.start()
    cmd = JudgeServerLauncher.vllm_command("m", 8000, "judge")
    assert cmd[:3] == ["vllm", "serve", "m"] and cmd[cmd.index("--served-model-name") + 1] == "judge"


def test_eval_line_gives_images_and_the_mean_over_categories():
    from cluster.progress import format_eval

    line = format_eval({"overall": 0.25, "n": 132.0, "step": 10, "single": 0.75, "spatial": 0.05, "eval_seconds": 3.0})
    assert line == ("srum: held-out accuracy at step 10: 25.0% of 132 images, 40.0% averaged over categories "
                    "(single 75%, spatial 5%)")
    assert format_eval({"overall": 0.5, "step": 1}) == "srum: held-out accuracy at step 1: 50.0%"
