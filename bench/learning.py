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

    python bench/learning.py                  # 3 seeds, the full budget (~15-25 min on 2 cores)
    python bench/learning.py --seeds 1 --steps 10 --eval-seeds 1   # a quick look
    python bench/learning.py --sample-from base   # train on a frozen base's samples (the paper's recipe)

Each arm runs the in-process reference loop (:func:`srum.local.run_local`: the same generate / score /
collate / train functions the service's actors wrap); only the Ray plumbing is left out so that 24 runs
fit in minutes.
Ends with `RESULT` lines (targets from the issue: SRUM >= base + 10 points; SRUM > self-SFT; SRUM's
training reward rises more than self-SFT's).
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
from learner.loss import exact_fit_accuracy, sample_loss_weight  # noqa: E402
from shapes import evaluator  # noqa: E402
from shapes.world import parse_prompt, prompt_records  # noqa: E402
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


CATEGORIES = ("single", "counting", "color_binding", "spatial")


def evaluate(policy, prompts: list[str], eval_seeds: int, seed: int, guidance: float | None) -> dict[str, float]:
    """Accuracy on `prompts`, each drawn with `eval_seeds` seeds (the same for every arm), with CFG
    `guidance` (None = the policy's); `macro` is the mean over categories (GenEval's overall)."""
    images, specs = [], []
    for k in range(eval_seeds):
        for i in range(0, len(prompts), 16):
            chunk = prompts[i : i + 16]
            seeds = [10_000_000 + 1000 * seed + 100 * k + j for j in range(i, i + len(chunk))]
            batch = policy.sample(chunk, seeds, guidance=guidance)
            images += list(batch.images.numpy())
            specs += [parse_prompt(p) for p in chunk]
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


def run_one(arm: str, seed: int, steps: int, eval_seeds: int, overrides: list[str], sample_from: str = "current") -> dict:
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
    acc = evaluate(policy, heldout, eval_seeds, seed, g)
    # a fixed quarter of the training prompts: did the arm learn what it trained on, whatever the transfer?
    probe = evaluate(policy, train[::4], eval_seeds, seed, g)
    return {"arm": arm, "seed": seed, **acc, "train_probe": probe["overall"], "train_probe_macro": probe["macro"],
            **info, "seconds": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60, help="learner steps per arm (sample budget = steps x batch)")
    ap.add_argument("--eval-seeds", type=int, default=3, help="images per held-out prompt")
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
    print(f"shapes world: {args.seeds} seeds x {args.steps} steps x batch {cfg0.learner.batch_size} per arm, "
          f"samples from the {args.sample_from} policy; "
          f"eval {args.eval_seeds} images per held-out prompt; {args.jobs} runs at a time", flush=True)
    jobs = [(arm, seed) for seed in range(args.seeds) for arm in args.arms.split(",")]
    results: dict[str, list[dict]] = {}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        futures = [pool.submit(run_one, arm, seed, args.steps, args.eval_seeds, args.overrides,
                               args.sample_from) for arm, seed in jobs]
        for fut in as_completed(futures):
            r = fut.result()
            results.setdefault(r["arm"], []).append(r)
            cats = ", ".join(f"{k} {100 * v:.0f}" for k, v in r.items() if k in ("single", "counting",
                                                                                  "color_binding", "spatial"))
            print(f"{r['arm']:14s} seed {r['seed']}: held-out acc {100 * r['overall']:.1f}% (macro "
                  f"{100 * r['macro']:.1f}; {cats}); train-prompt probe {100 * r['train_probe']:.1f}%  "
                  f"{r['seconds']:.0f} s", flush=True)
    results = {arm: sorted(results[arm], key=lambda r: r["seed"]) for arm in args.arms.split(",") if arm in results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))

    def mean_std(arm: str, key: str = "overall") -> tuple[float, float]:
        xs = [100 * r[key] for r in results.get(arm, [])]
        return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (float("nan"), 0.0)

    def mean_of(arm: str, key: str) -> float:
        xs = [r[key] for r in results.get(arm, []) if key in r]
        return statistics.mean(xs) if xs else float("nan")

    print("\narm             held-out %       held-out macro %   train-prompt probe %  (mean ± std over seeds)"
          "   training reward: first -> last quarter")
    for arm in results:
        cols = [mean_std(arm, k) for k in ("overall", "macro", "train_probe")]
        print(f"{arm:14s}  " + "   ".join(f"{m:5.1f} ± {s:4.1f}  " for m, s in cols)
              + f"   {mean_of(arm, 'train_reward_first_quarter'):+.3f} -> {mean_of(arm, 'train_reward_last_quarter'):+.3f}")
    base = mean_std("base")[0]
    print("\narm             pool %   exact-fit bound %   predicted gain   measured gain over base   fit efficiency")
    efficiency: dict[str, float] = {}
    for arm in results:
        pool, bound = mean_of(arm, "pool_accuracy"), mean_of(arm, "predicted_accuracy")
        if arm == "base" or np.isnan(bound):
            continue
        predicted, measured = 100 * (bound - pool), mean_std(arm)[0] - base
        if abs(predicted) > 1e-9:  # uniform weights (self-SFT) predict no change: no efficiency to report
            efficiency[arm] = measured / predicted
        eff = f"{efficiency[arm]:+.2f}" if arm in efficiency else "n/a"
        print(f"{arm:14s}  {100 * pool:6.1f}   {100 * bound:12.1f}      {predicted:+8.2f}        {measured:+8.2f}"
              f"              {eff}")
    srum, sft = mean_std("srum")[0], mean_std("self_sft")[0]
    gain = srum - base
    print(f"RESULT srum_gain_over_base_points {gain:.1f} target=10 ok={str(gain >= 10).lower()}")
    print(f"RESULT srum_minus_self_sft_points {srum - sft:.1f} target=0 ok={str(srum > sft).lower()}")
    # the rise of SRUM's training reward beyond self-SFT's (which has no reward in its loss: its rise is drift)
    def rise(arm: str) -> float:
        return mean_of(arm, "train_reward_last_quarter") - mean_of(arm, "train_reward_first_quarter")

    extra = rise("srum") - rise("self_sft")
    print(f"RESULT srum_training_reward_rise_over_self_sft {extra:.3f} target=0 ok={str(extra > 0).lower()}")
    for arm, eff in efficiency.items():  # reported, no target: how much of the exact-fit gain training realised
        print(f"RESULT {arm}_fit_efficiency {eff:.2f} target=report ok={str(not np.isnan(eff)).lower()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
