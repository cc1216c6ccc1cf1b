"""Does self-rewarding help? SRUM and the paper's ablations on the shapes world, on CPU.

Every arm starts from the same pretrained base, gets the same sample budget (on-policy: each learner step
trains on a fresh batch sampled with the current weights), the same prompts and the same seeds; it is
then scored on the held-out prompts by the independent geometric evaluator (`shapes/evaluator.py`).

Arms: base (no training); self_sft (its own samples, uniform weight); srum (official reward map, the
constraint as Eq. 2 writes it); srum_reference (the constraint read as a KL to the frozen base,
``learner.constraint=reference``); srum_signed (signed map); sample_level; binarized; no_constraint
(lambda_c = 0); no_global.

The predicted bound: for every trained arm, the accuracy an exact fit of the pool it trained on would give
(:func:`learner.loss.exact_fit_accuracy`: each trained sample counts by its mean loss weight, correctness by
the geometric evaluator) beside the pool's own accuracy; the fit efficiency is the measured held-out gain
over the base divided by the predicted gain (bound minus pool accuracy).
Figures per arm: held-out accuracy (per image and the mean over categories), the same on a fixed quarter
of the training prompts, and the training reward (mean global score of its own samples) in the first and
last quarter of its steps. Evaluation samples with `policy.eval_guidance_scale` when it is set.

    python bench/learning.py                  # 5 seeds (3 per ablation), 100+ held-out images per category
    python bench/learning.py --seeds 1 --ablation-seeds 1 --steps 10 --eval-per-category 0   # a quick look
    python bench/learning.py --sample-from base   # train on a frozen base's samples (the paper's recipe)

Each arm runs the in-process reference loop (:func:`srum.local.run_local`: the same generate / score /
collate / train functions the service's actors wrap); only the Ray plumbing is left out so that 24 runs
fit in minutes.
Means come with 95 % intervals over seeds (:mod:`core.stats`); differences of arms are paired by seed (the
same evaluation seeds and prompts), else Welch's interval.
Ends with `RESULT` lines (targets from issue 11: SRUM >= base + 10 points with the interval's lower end above
5; SRUM >= self-SFT + 3 with it above 0; SRUM's training reward rises more than self-SFT's; the benchmark's
minutes, at most 90).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import SRUMConfig  # noqa: E402
from core.config_io import load_config  # noqa: E402
from core.stats import diff_ci95, mean_ci95, paired_diff_ci95  # noqa: E402
from learner.loss import exact_fit_accuracy, sample_loss_weight  # noqa: E402
from shapes import evaluator  # noqa: E402
from shapes.world import CATEGORIES, parse_prompt, prompt_of, prompt_records  # noqa: E402
from srum.local import run_local  # noqa: E402
from srum.registry import compose  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "default.yaml"

ARMS: dict[str, list[str]] = {
    "base": [],
    "self_sft": [],
    "srum": [],
    "srum_reference": ["learner.constraint=reference"],
    "srum_signed": ["reward.semantics=signed"],
    "sample_level": ["reward.granularity=sample"],
    "binarized": ["reward.binarize=true"],
    "no_constraint": ["learner.lambda_c=0.0"],
    "no_global": ["reward.use_global=false"],
}


def arm_config(arm: str, seed: int, extra: list[str]) -> SRUMConfig:
    return load_config(CONFIG, [f"run.seed={seed}", *ARMS[arm], *extra])


def evaluate(policy, prompts: list[str], eval_seeds: int, seed: int, guidance: float | None,
             per_category: int = 0) -> dict[str, float]:
    """Accuracy on `prompts`, each drawn with at least `eval_seeds` seeds and every category with at least
    `per_category` images (:func:`shapes.evaluator.eval_specs`; the seeds depend on the run seed only, so every
    arm of a seed sees the same noise), with CFG `guidance` (None = the policy's); `macro` is the mean over
    categories (GenEval's overall)."""
    specs = evaluator.eval_specs([parse_prompt(p) for p in prompts], eval_seeds, per_category)
    texts = [prompt_of(s) for s in specs]
    images = []
    for i in range(0, len(specs), 64):
        seeds = [10_000_000 + 100_000 * seed + j for j in range(i, min(i + 64, len(specs)))]
        images += list(policy.sample(texts[i : i + 64], seeds, guidance=guidance).images.numpy())
    acc = evaluator.accuracy(images, specs)
    acc["macro"] = statistics.mean(acc[c] for c in CATEGORIES if c in acc)
    return acc


def train_arm(arm: str, cfg: SRUMConfig, sample_from: str) -> tuple[object, dict[str, float]]:
    """``run.max_steps`` learner steps of ``learner.batch_size`` fresh samples each, drawn by the policy being
    trained (on-policy) or by a frozen copy of the base (``sample_from="base"``, the paper's recipe, where the
    base generates and the model then trains on its samples). Every arm's samples are judged (self-SFT trains
    on all of them at weight 1) so that the training reward of the first and last quarter of the run can be
    compared across arms. Returns the trained policy and the run's figures."""
    sampler = compose(cfg).policy() if sample_from == "base" else None
    pool: dict[str, tuple[bool, float]] = {}  # sample id -> (correct, mean loss weight)
    lc = cfg.learner

    def judge_pool(samples, batch) -> None:
        for s, image in zip(samples, batch.images.numpy(), strict=True):
            if not s.record.dropped:
                pool[s.sample_id] = (bool(evaluator.check(image, parse_prompt(s.record.prompt.text))["correct"]),
                                     sample_loss_weight(s.record.alpha, s.record.mean_R, lc.lambda_c, lc.constraint,
                                                        lc.weight_floor))

    run = run_local(cfg, sampler=sampler, weighting="uniform" if arm == "self_sft" else "reward",
                    on_scored=judge_pool)
    g_by_step = [r["rollout_global_score"] for r in run.steps if r["rollout_global_score"] is not None]
    q = max(1, len(g_by_step) // 4)
    trained = [pool[i] for r in run.steps for i in r["sample_ids"] if i in pool]
    bound = {}
    if trained and sum(w for _, w in trained) > 0:
        bound = {"pool_accuracy": statistics.mean(c for c, _ in trained),
                 "predicted_accuracy": exact_fit_accuracy([c for c, _ in trained], [w for _, w in trained])}
    return run.policy, {"dropped": run.buffer["dropped_total"] - run.buffer["dropped"].get("released", 0),
                        "train_reward_first_quarter": statistics.mean(g_by_step[:q]) if g_by_step else float("nan"),
                        "train_reward_last_quarter": statistics.mean(g_by_step[-q:]) if g_by_step else float("nan"),
                        "steps": run.learner.step, **bound}


def run_one(arm: str, seed: int, steps: int, eval_seeds: int, overrides: list[str], sample_from: str = "current",
            per_category: int = 0) -> dict:
    """One (arm, seed) run in its own process (one torch thread: the runs share the machine's cores)."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    extra = ["cluster.max_staleness=1000000"] if sample_from == "base" else []  # the frozen base stays at v0
    cfg = arm_config(arm, seed, [*overrides, f"run.max_steps={max(steps, 1)}", "run.eval_every=0", *extra])
    torch.manual_seed(seed)
    np.random.seed(seed)
    split = cfg.policy.split_seed
    train = [p.text for p in prompt_records(split, "train")]
    heldout = [p.text for p in prompt_records(split, "heldout")]
    info = {}
    if arm == "base":
        policy = compose(cfg).policy()  # the same base for every arm and seed
    else:
        policy, info = train_arm(arm, cfg, sample_from)
    g = cfg.policy.eval_guidance_scale
    acc = evaluate(policy, heldout, eval_seeds, seed, g, per_category)
    # a fixed quarter of the training prompts: did the arm learn what it trained on, whatever the transfer?
    probe = evaluate(policy, train[::4], eval_seeds, seed, g)
    return {"arm": arm, "seed": seed, **acc, "train_probe": probe["overall"], "train_probe_macro": probe["macro"],
            **info, "seconds": time.perf_counter() - t0}


PAPER_ORDER = ("srum", "no_constraint", "no_global", "binarized", "sample_level")  # the paper's ablation ordering


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--ablation-seeds", type=int, default=3, help="seeds of the arms other than base/self_sft/srum")
    ap.add_argument("--steps", type=int, default=60, help="learner steps per arm (sample budget = steps x batch)")
    ap.add_argument("--eval-seeds", type=int, default=1, help="images per held-out prompt, at least")
    ap.add_argument("--eval-per-category", type=int, default=100,
                    help="held-out images per category, at least (100: one image is at most 1 point of a category)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--out", default=str(REPO / "runs" / "learning.json"))
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (one torch thread each)")
    ap.add_argument("--sample-from", choices=("current", "base"), default="current",
                    help="training samples from the current policy (on-policy, as the service) or a frozen base"
                         " (the paper's recipe; the training reward then stays the base's)")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for every arm")
    args = ap.parse_args()
    cfg0 = load_config(CONFIG, args.overrides)
    compose(cfg0).prepare()  # pretrain the base once, before the workers start
    arms = args.arms.split(",")
    jobs = [(arm, seed) for arm in arms
            for seed in range(args.seeds if arm in ("base", "self_sft", "srum") else args.ablation_seeds)]
    print(f"shapes world: {args.seeds} seeds (ablations {args.ablation_seeds}) x {args.steps} steps x batch "
          f"{cfg0.learner.batch_size} per arm, samples from the {args.sample_from} policy; held-out eval: at least "
          f"{args.eval_seeds} image(s) per prompt and {args.eval_per_category} per category; {args.jobs} runs at a "
          f"time, {len(jobs)} runs", flush=True)
    t_start = time.perf_counter()
    results: dict[str, list[dict]] = {}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        futures = [pool.submit(run_one, arm, seed, args.steps, args.eval_seeds, args.overrides,
                               args.sample_from, args.eval_per_category) for arm, seed in jobs]
        for fut in as_completed(futures):
            r = fut.result()
            results.setdefault(r["arm"], []).append(r)
            cats = ", ".join(f"{k} {100 * r[k]:.0f}" for k in CATEGORIES if k in r)
            print(f"{r['arm']:14s} seed {r['seed']}: held-out acc {100 * r['overall']:.1f}% of {r['n']:.0f} (macro "
                  f"{100 * r['macro']:.1f}; {cats}); train-prompt probe {100 * r['train_probe']:.1f}%  "
                  f"{r['seconds']:.0f} s", flush=True)
    results = {arm: sorted(results[arm], key=lambda r: r["seed"]) for arm in arms if arm in results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    report(results)
    minutes = (time.perf_counter() - t_start) / 60
    print(f"RESULT learning_bench_minutes {minutes:.1f} target=90 ok={str(minutes <= 90).lower()}")
    return 0


def points(results: dict[str, list[dict]], arm: str, key: str = "overall") -> list[float]:
    return [100 * r[key] for r in results.get(arm, []) if key in r]


def gain(results: dict[str, list[dict]], arm: str, other: str) -> tuple[float, float, str]:
    """``(mean difference in points, 95 % half-width, how)``: paired by seed when every seed of ``arm`` has a run
    of ``other`` (the two share evaluation seeds and prompts), else Welch's unpaired interval."""
    a = {r["seed"]: 100 * r["overall"] for r in results.get(arm, [])}
    b = {r["seed"]: 100 * r["overall"] for r in results.get(other, [])}
    if len(a) > 1 and set(a) <= set(b):
        d, half, n = paired_diff_ci95(a, b)
        return d, half, f"paired, {n} seeds"
    d, half = diff_ci95(list(a.values()), list(b.values()))
    return d, half, "unpaired"


def report(results: dict[str, list[dict]]) -> None:
    """Per arm: held-out accuracy with its 95 % interval over seeds, per category, the training probe and reward;
    the exact-fit bound and fit efficiency; the RESULT lines of the issue's targets."""
    def mean_of(arm: str, key: str) -> float:
        xs = [r[key] for r in results.get(arm, []) if key in r]
        return statistics.mean(xs) if xs else float("nan")

    def ci(arm: str, key: str = "overall") -> str:
        xs = points(results, arm, key)
        return "n/a" if not xs else "{:5.1f} ± {:4.1f}".format(*mean_ci95(xs))

    print("\nheld-out accuracy %, mean ± 95 % CI over seeds (n = seeds)")
    print(f"{'arm':14s} n  {'overall':13s} {'macro':13s} " + " ".join(f"{c[:8]:13s}" for c in CATEGORIES)
          + f" {'train probe':13s} training reward first -> last quarter")
    for arm in results:
        print(f"{arm:14s} {len(results[arm])}  " + " ".join(f"{ci(arm, k):13s}" for k in ("overall", "macro",
                                                                                         *CATEGORIES, "train_probe"))
              + f" {mean_of(arm, 'train_reward_first_quarter'):+.3f} -> {mean_of(arm, 'train_reward_last_quarter'):+.3f}")
    base_pts = points(results, "base")
    print("\narm             pool %   exact-fit bound %   predicted gain   measured gain over base (95 % CI)   fit efficiency")
    efficiency: dict[str, float] = {}
    for arm in results:
        pool, bound = mean_of(arm, "pool_accuracy"), mean_of(arm, "predicted_accuracy")
        if arm == "base" or np.isnan(bound) or not base_pts:
            continue
        predicted = 100 * (bound - pool)
        measured, half, _ = gain(results, arm, "base")
        if abs(predicted) > 1e-9:  # uniform weights (self-SFT) predict no change: no efficiency to report
            efficiency[arm] = measured / predicted
        eff = f"{efficiency[arm]:+.2f}" if arm in efficiency else "n/a"
        print(f"{arm:14s}  {100 * pool:6.1f}   {100 * bound:12.1f}      {predicted:+8.2f}        {measured:+6.2f} ± "
              f"{half:4.2f}              {eff}")
    present = [a for a in PAPER_ORDER if a in results]
    if len(present) > 1:
        ours = sorted(present, key=lambda a: -statistics.mean(points(results, a)))
        print(f"\nablation ordering (held-out mean): {' > '.join(ours)}; the paper's: {' > '.join(PAPER_ORDER)}"
              + ("" if ours == present else " (differs)"))
    for name, other, target, low in (("srum_gain_over_base_points", "base", 10.0, 5.0),
                                     ("srum_minus_self_sft_points", "self_sft", 3.0, 0.0)):
        if not points(results, "srum") or not points(results, other):
            continue
        d, half, how = gain(results, "srum", other)
        print(f"srum - {other}: {d:+.2f} ± {half:.2f} points (95 % CI, {how})")
        ok = d >= target and d - half > low
        print(f"RESULT {name} {d:.1f} target={target:g} ok={str(ok).lower()}")
        print(f"RESULT {name}_ci95_low {d - half:.1f} target={low:g} ok={str(d - half > low).lower()}")

    def rise(arm: str) -> float:  # self-SFT has no reward in its loss: its rise is drift
        return mean_of(arm, "train_reward_last_quarter") - mean_of(arm, "train_reward_first_quarter")

    extra = rise("srum") - rise("self_sft")
    print(f"RESULT srum_training_reward_rise_over_self_sft {extra:.3f} target=0 ok={str(extra > 0).lower()}")
    for arm, eff in efficiency.items():  # reported, no target: how much of the exact-fit gain training realised
        print(f"RESULT {arm}_fit_efficiency {eff:.2f} target=report ok={str(not np.isnan(eff)).lower()}")


if __name__ == "__main__":
    sys.exit(main())
