"""`srum eval`: how good is a policy on a benchmark's prompts, and did training help?

    srum eval -c configs/sd35_medium_vllm.yaml --prompts data/geneval/evaluation_metadata.jsonl \\
        --model base --model ema:runs/sd35m-qwen25vl7b/checkpoints --k 4
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m srum.evaluate -c ... --model ...

Each ``--model`` is ``base`` (the pretrained weights), a checkpoint (``PATH`` or ``trainable:PATH``: a run's
``checkpoints/`` folder, which follows ``latest``, or a step dir) or its EMA (``ema:PATH``). Every model
generates ``k`` images per prompt with the same seeds (``eval.seed``), on ``eval.num_samplers`` Ray sampler
actors (``--in-process``: one policy in this process, no Ray), with the evaluation guidance
(``policy.eval_guidance_scale``). The images are graded by the VLM evaluator (the judge client of the
``judge`` section, or ``eval.judge_model`` / ``eval.judge_endpoints``; the evaluation prompt of
``rewards/eval_prompts.py``: 0-100 against the category's rubric, structured output), or, for the shapes
world, by its geometric evaluator. Prompt sets: GenEval's ``evaluation_metadata.jsonl``, T2I-CompBench's
category JSON files, a text file (``--prompts``, or ``eval.prompts``); the shapes world defaults to its
held-out prompts.

Outputs in ``--out`` (default ``<run.output_dir>/<run.name>/eval/<time>``): ``results.json`` (per model:
per-category and overall scores with 95% intervals, and every image's grade and reason; with two or more
models each one's paired difference from the first), ``report.html`` and ``images/<model>/``. Exit status: 0
done, 2 bad input (config, prompt file, missing checkpoint or EMA, judge down), 1 nothing could be graded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from actors.evaluation import EvalItem, EvalSamplerActor, eval_items, generate_images, records_of
from core.config import SRUMConfig
from core.config_io import ConfigError
from core.eval_records import EvalImageRecord, compare, summarize
from core.prompt_sets import PromptSourceError
from learner.checkpoint import CheckpointError
from rewards.judge import JudgeError

log = logging.getLogger("srum.evaluate")

__all__ = ["ModelSpec", "build_parser", "main", "parse_model", "run_eval"]

SAMPLER_CALLS_IN_FLIGHT = 2


class EvalError(RuntimeError):
    """The evaluation could not produce a result (e.g. no image could be graded)."""


@dataclass(frozen=True)
class ModelSpec:
    """Which weights to evaluate: ``weights`` is ``base``, ``trainable`` or ``ema`` (of ``checkpoint``)."""

    label: str
    weights: str
    checkpoint: str | None = None


def parse_model(spec: str) -> ModelSpec:
    """``base`` | ``PATH`` | ``trainable:PATH`` | ``ema:PATH`` -> :class:`ModelSpec` (label: base, or the
    checkpoint's step dir name, ``-ema`` for its EMA)."""
    spec = spec.strip()
    if spec == "base":
        return ModelSpec("base", "base")
    weights, _, path = spec.partition(":") if spec.startswith(("ema:", "trainable:")) else ("trainable", "", spec)
    if not path:
        raise ValueError(f"--model {spec!r}: give 'base', a checkpoint path, 'trainable:PATH' or 'ema:PATH'")
    name = Path(path).name if Path(path).name.startswith("step_") else Path(path).parent.name
    return ModelSpec(f"{name or 'checkpoint'}{'-ema' if weights == 'ema' else ''}", weights, path)


def _unique_labels(models: Sequence[ModelSpec]) -> list[ModelSpec]:
    seen: dict[str, int] = {}
    out = []
    for m in models:
        n = seen.get(m.label, 0)
        seen[m.label] = n + 1
        out.append(m if n == 0 else ModelSpec(f"{m.label}-{n + 1}", m.weights, m.checkpoint))
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80] or "_"


def load_model_state(spec: ModelSpec, cfg: SRUMConfig, source: str,
                     allow_config_change: bool) -> tuple[dict[str, Any] | None, int, int]:
    """``(state or None for the base, seed the policy is built with, version)`` of a model spec."""
    if spec.weights == "base":
        return None, cfg.run.seed, 0
    from learner.export import load_weights
    from srum.export import check_training_fields

    state, meta, _ = load_weights(spec.checkpoint, spec.weights)  # type: ignore[arg-type]
    check_training_fields(cfg, meta, source, allow_config_change)
    return state, int(meta.get("seed", cfg.run.seed)), int(meta.get("version", 0))


class RaySamplers:
    """``eval.num_samplers`` :class:`EvalSamplerActor`s per policy seed, reused for every model evaluated."""

    def __init__(self, components: Any, cfg: SRUMConfig):
        import ray

        res = cfg.cluster.sampler_resources
        self.cls = ray.remote(EvalSamplerActor).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus)
        self.components, self.n, self.by_seed = components, cfg.eval.num_samplers, {}

    def actors(self, seed: int, state: dict[str, Any] | None, version: int) -> list[Any]:
        import ray

        if seed not in self.by_seed:
            for other in self.by_seed.values():  # one set of policies at a time (GPU memory)
                for a in other:
                    ray.kill(a)
            self.by_seed = {seed: [self.cls.remote(self.components, seed) for _ in range(self.n)]}
        actors = self.by_seed[seed]
        ref = ray.put(state) if state is not None else None
        ray.get([a.load.remote(ref, version) for a in actors])
        return actors

    def close(self) -> None:
        import ray

        for actors in self.by_seed.values():
            for a in actors:
                ray.kill(a)


def _generate_ray(samplers: RaySamplers, items: Sequence[EvalItem], state: dict[str, Any] | None, seed: int,
                  version: int, cfg: SRUMConfig, guidance: float | None, bar: tqdm) -> list[np.ndarray]:
    import ray

    actors = samplers.actors(seed, state, version)
    bs = cfg.eval.batch_size
    chunks = [list(items[i:i + bs]) for i in range(0, len(items), bs)]
    results: dict[int, np.ndarray] = {}
    pending: dict[Any, tuple[int, Any]] = {}
    free = [a for a in actors for _ in range(SAMPLER_CALLS_IN_FLIGHT)]
    next_chunk = 0
    while next_chunk < len(chunks) or pending:
        while free and next_chunk < len(chunks):
            actor = free.pop(0)
            c = chunks[next_chunk]
            ref = actor.sample.remote([it.prompt.text for it in c], [it.seed for it in c], guidance)
            pending[ref] = (next_chunk, actor)
            next_chunk += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        index, actor = pending.pop(done[0])
        results[index] = ray.get(done[0])
        bar.update(len(chunks[index]))
        free.append(actor)
    return [img for i in range(len(chunks)) for img in results[i]]


def _save_images(images: Sequence[np.ndarray], items: Sequence[EvalItem], folder: Path, rel_to: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for img, it in zip(images, items, strict=True):
        p = folder / f"{_slug(it.prompt.id)}_{it.index}.png"
        Image.fromarray(np.asarray(img, dtype=np.uint8)).save(p)
        paths.append(str(p.relative_to(rel_to)))
    return paths


def run_eval(cfg: SRUMConfig, models: Sequence[ModelSpec], out_dir: str | Path, *, k: int | None = None,
             in_process: bool = False, source: str = "config", allow_config_change: bool = False,
             report_prompts: int = 50) -> dict[str, Any]:
    """Generate, grade and report (see the module docstring); returns the ``results.json`` content."""
    from srum.registry import compose, eval_prompt_records, make_grader

    if not models:
        raise ValueError("no models to evaluate: give --model base and/or a checkpoint")
    models = _unique_labels(models)
    k = k or cfg.run.eval_seeds
    prompts = eval_prompt_records(cfg)
    items = eval_items(prompts, k, cfg.eval.seed)
    # the policies embed (and with offload_text_encoders precompute) the evaluation prompts, never train
    build_cfg = cfg.model_copy(update={
        "run": cfg.run.model_copy(update={"eval_every": 0}),
        "cluster": cfg.cluster.model_copy(update={"prompts": cfg.eval.prompts}) if cfg.eval.prompts.path else cfg.cluster})
    components = compose(build_cfg)
    components.prepare()
    grader = make_grader(cfg)
    judge = getattr(grader, "judge", None)
    if judge is not None:  # a judge that is down fails here, before any image is generated
        asyncio.run(_checked(judge))
    states = [load_model_state(m, cfg, source, allow_config_change) for m in models]  # fail early on bad paths
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    guidance = cfg.policy.eval_guidance_scale
    if not in_process:
        if not (cfg.cluster.address or os.environ.get("RAY_ADDRESS")):
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray stays on loopback
        from cluster.ray_cluster import connect_ray

        connect_ray(cfg)
    samplers = None if in_process else RaySamplers(components, cfg)
    try:
        all_records, timings = _evaluate_models(models, states, items, components, grader, samplers, cfg, out)
    finally:
        if samplers is not None:
            samplers.close()
    summaries = {m.label: summarize(all_records[m.label]) for m in models}
    base = models[0].label
    comparisons = {m.label: compare(all_records[base], all_records[m.label]) for m in models[1:]}
    scale = "geometric accuracy, %" if cfg.policy.kind == "shapes" else "VLM grade, 0-100"
    info = {"config": source, "policy.kind": cfg.policy.kind,
            "prompts": cfg.eval.prompts.path or "the world's held-out prompts", "prompt count": len(prompts),
            "images per prompt": k, "seed": cfg.eval.seed, "guidance": guidance, "scale": scale,
            "grader": type(grader).__name__ + (f" ({getattr(judge.cfg, 'model', judge.backend)}, mode "
                                               f"{cfg.eval.mode})" if judge is not None else ""),
            "models": ", ".join(f"{m.label} = {m.weights}{f' of {m.checkpoint}' if m.checkpoint else ''}" for m in models)}
    results = {"info": info, "models": [m.__dict__ for m in models], "summaries": summaries,
               "comparisons": {m: {"baseline": base, **c} for m, c in comparisons.items()}, "timings": timings,
               "grader_counts": dict(getattr(grader, "counts", {})),
               "records": {m: [r.model_dump() for r in rs] for m, rs in all_records.items()}}
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    from srum.eval_report import write_report

    write_report(out / "report.html", models=[m.label for m in models], summaries=summaries,
                 comparisons=comparisons, records=all_records, info=info, per_category=report_prompts)
    if all(s["overall"] is None for s in summaries.values()):
        raise EvalError(f"no image could be graded (see {out / 'results.json'}): "
                        f"{next(iter(all_records.values()))[0].error}")
    return results


def _evaluate_models(models: Sequence[ModelSpec], states: Sequence[tuple[Any, int, int]], items: Sequence[EvalItem],
                     components: Any, grader: Any, samplers: RaySamplers | None, cfg: SRUMConfig,
                     out: Path) -> tuple[dict[str, list[EvalImageRecord]], dict[str, dict[str, float]]]:
    """Generate (Ray sampler actors, or in process when ``samplers`` is None), save and grade each model."""
    guidance = cfg.policy.eval_guidance_scale
    all_records: dict[str, list[EvalImageRecord]] = {}
    timings: dict[str, dict[str, float]] = {}
    for spec, (state, seed, version) in zip(models, states, strict=True):
        t0 = time.perf_counter()
        with tqdm(total=len(items), desc=f"{spec.label}: generate", unit="img", file=sys.stderr) as bar:
            if samplers is None:
                policy = components.policy(seed=seed)
                if state is not None:
                    policy.load_trainable_state(state, version)
                images = generate_images(policy, items, cfg.eval.batch_size, guidance, progress=bar.update)
                del policy
            else:
                images = _generate_ray(samplers, items, state, seed, version, cfg, guidance, bar)
        t1 = time.perf_counter()
        paths = _save_images(images, items, out / "images" / _slug(spec.label), out)
        grades = asyncio.run(_grade(grader, images, items))
        all_records[spec.label] = records_of(spec.label, items, grades, paths)
        timings[spec.label] = {"generate_s": t1 - t0, "grade_s": time.perf_counter() - t1}
    return all_records, timings


async def _checked(judge: Any) -> None:
    try:
        await judge.check_health()
    finally:
        await judge.aclose()


async def _grade(grader: Any, images: Sequence[np.ndarray], items: Sequence[EvalItem]) -> list[Any]:
    judge = getattr(grader, "judge", None)
    try:
        return await grader.grade_many(images, [it.prompt.text for it in items], [it.prompt.category for it in items])
    finally:
        if judge is not None:
            await judge.aclose()


def _summary_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for label, s in results["summaries"].items():
        cats = ", ".join(f"{c} {100 * v['score']:.1f}" for c, v in s["categories"].items() if v["score"] is not None)
        overall = "-" if s["overall"] is None else f"{100 * s['overall']:.1f}"
        ci = f" [{100 * s['ci'][0]:.1f}, {100 * s['ci'][1]:.1f}]" if s["ci"] else ""
        lines.append(f"{label}: overall {overall}{ci} (n={s['n']}, failed {s['failed']}) | {cats}")
    for label, c in results["comparisons"].items():
        o = c["overall"]
        if o["delta"] is not None:
            ci = f" [{100 * o['ci'][0]:+.1f}, {100 * o['ci'][1]:+.1f}]" if o["ci"] else ""
            lines.append(f"{label} - {c['baseline']}: {100 * o['delta']:+.1f}{ci} over {o['prompts']} prompts")
    return lines


def build_parser(prog: str = "python -m srum.evaluate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Evaluate base / checkpoint / EMA weights on a prompt set.")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. eval.prompts.limit=50")
    p.add_argument("--config", "-c", default=None,
                   help="config (default: the run config.yaml of the first checkpoint, else built-in defaults)")
    p.add_argument("--model", "-m", action="append", default=None,
                   help="base | PATH | trainable:PATH | ema:PATH (repeat to compare; the first is the baseline)")
    p.add_argument("--prompts", default=None, help="prompt file (sets eval.prompts.path)")
    p.add_argument("--format", default=None, choices=("auto", "txt", "t2i_compbench", "geneval"),
                   help="prompt file format (sets eval.prompts.format)")
    p.add_argument("--categories", nargs="+", default=None, help="keep these categories")
    p.add_argument("--limit", type=int, default=None, help="keep at most this many prompts")
    p.add_argument("--k", type=int, default=None, help="images per prompt (default: run.eval_seeds)")
    p.add_argument("--samplers", type=int, default=None, help="sampler actors (sets eval.num_samplers)")
    p.add_argument("--in-process", action="store_true", help="generate in this process, without Ray")
    p.add_argument("--out", default=None, help="output dir (default: <output_dir>/<run.name>/eval/<time>)")
    p.add_argument("--report-prompts", type=int, default=50, help="prompts per category shown in report.html")
    p.add_argument("--allow-config-change", action="store_true",
                   help="evaluate a checkpoint although the config's training fields differ from its own")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m srum.evaluate") -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser(prog).parse_intermixed_args(argv)
    overrides = list(args.overrides)
    for key, value in (("eval.prompts.path", args.prompts), ("eval.prompts.format", args.format),
                       ("eval.prompts.limit", args.limit), ("eval.num_samplers", args.samplers)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.categories:
        overrides.append(f"eval.prompts.categories=[{', '.join(json.dumps(c) for c in args.categories)}]")
    try:
        from cluster.health import storage_dir
        from srum.export import config_for_checkpoint

        models = [parse_model(m) for m in (args.model or ["base"])]
        first_ckpt = next((m.checkpoint for m in models if m.checkpoint), None)
        cfg, source = config_for_checkpoint(first_ckpt, args.config, overrides)
        out = Path(args.out) if args.out else (storage_dir(cfg.run.output_dir) / cfg.run.name / "eval"
                                               / time.strftime("%Y%m%d-%H%M%S"))
        results = run_eval(cfg, models, out, k=args.k, in_process=args.in_process, source=source,
                           allow_config_change=args.allow_config_change, report_prompts=args.report_prompts)
    except (ConfigError, PromptSourceError, CheckpointError, JudgeError, ValueError) as exc:
        print(f"srum eval: {exc}", file=sys.stderr)
        return 2
    except EvalError as exc:
        print(f"srum eval: {exc}", file=sys.stderr)
        return 1
    for line in _summary_lines(results):
        print(f"srum eval: {line}")
    print(f"srum eval: results in {out / 'results.json'}, report {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
