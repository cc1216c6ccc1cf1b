"""`srum scale` / `srum status` against a stand-in controller (the real one is exercised end to end in
tests/test_service_e2e.py and tests/test_judge_launch.py): what is sent, and what the user reads."""

from __future__ import annotations

import types

import pytest

import cluster.progress
from srum import cli


class FakeController:
    def __init__(self, status: dict | None = None):
        self.calls: list[dict] = []
        self.status = status or {}
        ctl = self

        class _Scale:
            @staticmethod
            def remote(**kw):
                ctl.calls.append(kw)
                return {"samplers": 2, "scorers": 1, **({"judges": kw["judges"]} if kw.get("judges") else {})}

        class _Status:
            @staticmethod
            def remote():
                return ctl.status

        self.scale, self.get_status = _Scale(), _Status()


@pytest.fixture
def controller(monkeypatch):
    def install(status: dict | None = None) -> FakeController:
        ctl = FakeController(status)
        fake_ray = types.SimpleNamespace(get=lambda x: x, exceptions=types.SimpleNamespace(RayTaskError=RuntimeError))
        monkeypatch.setattr(cli, "_controller", lambda address: (fake_ray, ctl))
        return ctl
    return install


def test_scale_sends_judges_and_reports_them(controller, capsys):
    ctl = controller()
    assert cli.main(["scale", "--judges", "3"]) == 0
    assert ctl.calls == [{"samplers": None, "scorers": None, "judges": 3}]
    assert "judges=3" in capsys.readouterr().out


def test_scale_with_nothing_to_change_is_an_error(controller, capsys):
    ctl = controller()
    assert cli.main(["scale"]) == 2
    assert ctl.calls == [] and "--judges J" in capsys.readouterr().err


def test_status_shows_the_round_and_the_judge_replicas(controller, monkeypatch, capsys):
    monkeypatch.setattr(cluster.progress, "format_progress", lambda status: "progress line")
    controller({"buffer": {}, "lags": [0, 1],
                "round": {"round": 2, "phase": "train", "version": 8, "submitted": 256, "target": 256, "pool": 240,
                          "epochs": 4},
                "judges": {"desired": 2, "ready": 1, "server_restarts": 1, "failures": 0,
                           "urls": ["http://127.0.0.1:4100/v1"]}})
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "round 2: train (policy version 8; 256/256 generated, pool 240, 4 epochs)" in out
    assert "judge replicas: 1/2 ready, 1 server restarts, 0 failures; http://127.0.0.1:4100/v1" in out
