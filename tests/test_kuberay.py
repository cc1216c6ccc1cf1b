"""deploy/kuberay/: the RayJob manifest, checked structurally (no Kubernetes here): it loads, its entrypoint is
the srum job with a config the job's own loader accepts (after both shells it passes through), the judge
replicas it launches land on the worker group that advertises their custom resource and has their GPUs, the
other actors fit the other GPU group, run.output_dir is a shared volume on every Ray pod, and the versions and
images match the project's."""

from __future__ import annotations

import json
import re
import shlex
from importlib.metadata import version
from pathlib import Path
from subprocess import list2cmdline

import pytest
import yaml

from cluster.judges import STRUCTURED_OUTPUTS, server_command
from core.config_io import load_config

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "deploy" / "kuberay" / "srum-rayjob.yaml"
IMAGE_ROOT = "/srum"  # where deploy/ray.Dockerfile puts the source


@pytest.fixture(scope="module")
def docs() -> dict[tuple[str, str], dict]:
    loaded = [d for d in yaml.safe_load_all(MANIFEST.read_text(encoding="utf-8")) if d]
    out = {(d["kind"], d["metadata"]["name"]): d for d in loaded}
    assert len(out) == len(loaded)  # no duplicate names
    return out


@pytest.fixture(scope="module")
def job(docs) -> dict:
    jobs = [d for (kind, _), d in docs.items() if kind == "RayJob"]
    assert len(jobs) == 1 and jobs[0]["apiVersion"] == "ray.io/v1"
    return jobs[0]


def entrypoint(job: dict) -> tuple[Path, list[str]]:
    text = job["spec"]["entrypoint"]
    assert not re.search(r"[$`]", text)  # nothing either shell would expand
    args = shlex.split(text)  # the submitter pod's shell (KubeRay runs `ray job submit ... -- <entrypoint>`)
    assert shlex.split(list2cmdline(args)) == args  # `ray job submit` rejoins the words; the job supervisor's shell
    assert args[:4] == ["python", "-m", "srum.main", "--config"]
    path = Path(args[4])
    assert path.is_absolute() and path.parts[:2] == ("/", IMAGE_ROOT.strip("/"))  # the image's copy of configs/
    return ROOT / path.relative_to(IMAGE_ROOT), args[5:]


def pods(job: dict) -> list[tuple[dict, int]]:
    spec = job["spec"]["rayClusterSpec"]
    out = [(spec["headGroupSpec"], 1)]
    out += [(g, int(g["replicas"])) for g in spec["workerGroupSpecs"]]
    return out


def _cpu(value: str) -> float:
    return float(value[:-1]) / 1000 if str(value).endswith("m") else float(value)


def _limits(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]


def _gpus(group: dict) -> int:
    return int(_limits(group).get("nvidia.com/gpu", 0))


def advertised(group: dict) -> dict[str, float]:
    """The custom resources a group's pods give `ray start --resources` (KubeRay's rayStartParams format: a
    shell-quoted JSON object)."""
    raw = group.get("rayStartParams", {}).get("resources")
    if raw is None:
        return {}
    words = shlex.split(raw)
    assert len(words) == 1, raw
    return {k: float(v) for k, v in json.loads(words[0]).items()}


def _packs(fractions: list[float], bins: int) -> bool:
    """Whether GPU fractions fit ``bins`` GPUs, first fit decreasing (one actor stays on one GPU, as in Ray)."""
    free = [1.0] * bins
    for f in sorted(fractions, reverse=True):
        slot = next((i for i, room in enumerate(free) if f <= room + 1e-9), None)
        if slot is None:
            return False
        free[slot] -= f
    return True


def _compose_vllm_release() -> str:
    compose = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    return re.search(r"vllm/vllm-openai:v(\d+\.\d+\.\d+)", compose).group(1)


def test_the_entrypoint_config_validates_with_the_jobs_loader(job):
    path, overrides = entrypoint(job)
    cfg = load_config(path, overrides)  # what srum.main does first; raises a ConfigError naming any bad key
    launch = cfg.judge.launch
    assert launch is not None and launch.replicas >= 1 and "endpoints" not in cfg.judge.model_fields_set
    assert launch.host == "0.0.0.0"  # the URL names the pod's IP, which the scorers on the other pods reach
    command = server_command(launch, launch.model or cfg.judge.model, cfg.judge.model)
    assert command[command.index("--served-model-name") + 1] == cfg.judge.model
    flag = command.index("--structured-outputs-config")
    assert json.loads(command[flag + 1]) == json.loads(STRUCTURED_OUTPUTS) == {
        "backend": "xgrammar", "disable_any_whitespace": True}
    extra = launch.extra_args
    assert json.loads(extra[extra.index("--limit-mm-per-prompt") + 1]) == {"image": 2, "video": 0}
    assert launch.env.get("HF_HOME", "").startswith("/models/") and launch.env.get("PYTHONPATH", "") is None
    assert cfg.regions.checkpoint.startswith("/models/") and cfg.cluster.prompts.path.startswith("/models/")


def test_the_kuberay_config_is_the_vllm_example_without_endpoints(job):
    path, _ = entrypoint(job)
    ours = yaml.safe_load(path.read_text(encoding="utf-8"))
    example = yaml.safe_load((ROOT / "configs" / "sd35_medium_vllm.yaml").read_text(encoding="utf-8"))
    del example["judge"]["endpoints"]  # judge.launch (the entrypoint's) excludes it; an override cannot unset it
    assert ours == example


def test_the_judge_replicas_land_on_the_judge_group(job, docs):
    assert {kind for kind, _ in docs} == {"PersistentVolumeClaim", "RayJob"}  # no judge outside the job
    path, overrides = entrypoint(job)
    launch = load_config(path, overrides).judge.launch
    assert launch.resources  # without one, a replica could take a GPU of the samplers' group
    head, *workers = pods(job)
    assert not advertised(head[0])
    hosts = [(g, n) for g, n in workers if all(k in advertised(g) for k in launch.resources)]
    assert len(hosts) == 1
    group, pods_n = hosts[0]
    units = advertised(group)
    assert all(units[k] >= need for k, need in launch.resources.items())  # a replica fits one pod
    per_pod = min(int(units[k] // need) for k, need in launch.resources.items() if need > 0)
    assert launch.replicas <= per_pod * pods_n  # every replica has a pod to go to
    assert launch.num_gpus * launch.replicas <= _gpus(group) * pods_n and launch.num_gpus <= _gpus(group)
    assert launch.num_cpus * launch.replicas <= _cpu(_limits(group)["cpu"]) * pods_n
    # that group's image is the srum image with vLLM in its own venv, the release docker-compose.yml pins
    built = re.search(r"--build-arg VLLM_VERSION=(\S+) -t (\S+)", MANIFEST.read_text(encoding="utf-8"))
    assert built and built.group(1) == _compose_vllm_release()
    image = group["template"]["spec"]["containers"][0]["image"]
    assert image.split(":")[0] == built.group(2) and image != head[0]["template"]["spec"]["containers"][0]["image"]
    dockerfile = (ROOT / "deploy" / "ray.Dockerfile").read_text(encoding="utf-8")
    assert "ARG VLLM_VERSION=\n" in dockerfile and "/opt/vllm/bin/pip install" in dockerfile
    command = server_command(launch, launch.model or "m", "m")
    # `vllm` from PATH is the image's link to /opt/vllm/bin/vllm (or the command names the venv's own)
    assert (command[0] == "vllm" and "ln -sf /opt/vllm/bin/vllm /usr/local/bin/vllm" in dockerfile
            or command[0].startswith("/opt/vllm/bin/"))


def test_run_output_dir_is_a_shared_volume_on_every_ray_pod(job, docs):
    path, overrides = entrypoint(job)
    cfg = load_config(path, overrides)
    assert cfg.run.output_dir == "/srum-runs"
    for group, _ in pods(job):
        spec = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
                  if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for c in spec["containers"] for m in c["volumeMounts"]}
        claim = claims[mounts[cfg.run.output_dir]]
        assert "ReadWriteMany" in docs[("PersistentVolumeClaim", claim)]["spec"]["accessModes"]
        env = {e["name"]: e["value"] for c in spec["containers"] for e in c.get("env", [])}
        assert env["SRUM_STORAGE"] == cfg.run.output_dir and env["PYTHONPATH"] == IMAGE_ROOT
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_the_actors_fit_the_pods(job):
    path, overrides = entrypoint(job)
    cfg = load_config(path, overrides)
    c = cfg.cluster
    actors = [(c.learner_resources, 1), (c.sampler_resources, c.num_samplers), (c.scorer_resources, c.num_scorers)]
    head, *workers = pods(job)
    assert head[0]["rayStartParams"]["num-gpus"] == "0"  # the head schedules no GPU work
    # the learner, samplers and scorers go to the GPU groups the judge replicas do not claim (the judges start
    # first and take their group's GPUs whole)
    judge_keys = set(cfg.judge.launch.resources)
    others = [(g, n) for g, n in workers if not judge_keys & set(advertised(g))]
    assert others
    bins = sum(_gpus(g) * n for g, n in others)
    fractions = [r.num_gpus for r, n in actors for _ in range(n) if r.num_gpus > 0]
    assert fractions and _packs(fractions, bins)
    want_cpus = sum(r.num_cpus * n for r, n in actors)
    assert want_cpus <= sum(_cpu(_limits(g)["cpu"]) * n for g, n in others)
    for group, _ in pods(job):
        res = group["template"]["spec"]["containers"][0]["resources"]
        assert res["limits"] == res["requests"]  # guaranteed QoS: what Ray is told is what the pod has


def test_versions_match_the_project(job):
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == version("ray")
    dockerfile = (ROOT / "deploy" / "ray.Dockerfile").read_text()
    assert f"COPY --chown=ray:users . {IMAGE_ROOT}" in dockerfile and f"WORKDIR {IMAGE_ROOT}" in dockerfile
