"""Benchmark: ``Learner.train_step`` vs a bare hand-written torch loop on the same model and batch.

Both do the same work per step: logit-normal t with shift, Gaussian noise, x_t, transformer forward,
reward-weighted flow-matching loss, backward, grad-norm clip 1.0, AdamW step, and one host sync for
the loss. The bare loop uses pre-computed text conditioning and no bookkeeping; the learner adds
its batch validation, prompt-cache lookup, loss-part logging, non-finite checks, LR scheduler and
metrics. Steps are interleaved (alternating which goes first) after a warm-up, and the median of
each is compared. The model is a tiny random SD3 pipeline sized by the flags (default: 4 layers,
width 128, 64x64 images -> 256 tokens), float32 on CPU, bf16 autocast on CUDA.

Usage: ``python bench/learner_step.py [--steps 30] [--warmup 5] [--device auto] [--lora-rank 0]``.
Final line: ``RESULT learner_step_ratio <ratio> target=1.10 ok=<true|false>``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import DiffusersPolicyConfig, LearnerConfig  # noqa: E402
from core.records import TrainBatch  # noqa: E402
from learner.base import resolve_device  # noqa: E402
from learner.learner import Learner  # noqa: E402
from learner.policy import DiffusersPolicy  # noqa: E402
from learner.tiny import build_tiny_sd3  # noqa: E402

TARGET = 1.10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per method (median reported)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps per method")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (latent = size / 2)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--lora-rank", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    device = resolve_device(args.device)
    pc = DiffusersPolicyConfig(device=str(device), lora_rank=args.lora_rank, height=args.size, width=args.size)
    lc = LearnerConfig(lr=1e-5, warmup_steps=0, grad_clip=1.0, lambda_c=0.5, timestep_shift=4.0)
    pipe = build_tiny_sd3(0, num_layers=args.layers, attention_head_dim=args.head_dim,
                          num_attention_heads=args.heads)
    policy = DiffusersPolicy(pipe, "sd3", device=device, lora_rank=args.lora_rank, height=args.size, width=args.size)
    learner = Learner((pc, lc), policy, seed=0)

    b, h = args.batch, args.size // policy.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    prompts = [f"prompt {i}" for i in range(b)]
    x0 = torch.randn(b, 4, h, h, generator=g)
    R, alpha = torch.rand(b, h, h, generator=g), torch.rand(b, generator=g)
    batch = TrainBatch(prompts, x0, R, alpha)

    # ---- bare loop: same model, same math, no framework around it
    params = policy.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=lc.lr, betas=tuple(lc.betas), eps=lc.eps, weight_decay=0.0)
    cond = policy.encode(prompts)
    emb, pooled = cond.embeds, cond.pooled
    x0_d, w_d = x0.to(device), (alpha[:, None, None] * R + lc.lambda_c)[:, None].to(device)
    bare_gen = torch.Generator().manual_seed(1)
    shift = lc.timestep_shift
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if learner.autocast_dtype is not None
                else torch.autocast(device.type, enabled=False))

    def bare_step() -> float:
        u = torch.sigmoid(torch.randn(b, generator=bare_gen))
        t = (shift * u / (1 + (shift - 1) * u)).to(device)
        noise = torch.randn(x0.shape, generator=bare_gen).to(device)
        tb = t[:, None, None, None]
        x_t = (1 - tb) * x0_d + tb * noise
        with autocast:
            v = policy.transformer(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=emb,
                                   pooled_projections=pooled, return_dict=False)[0]
        loss = (w_d * (v.float() - (noise - x0_d)).square()).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def learner_step() -> None:
        learner.train_step(batch)

    for _ in range(args.warmup):
        learner_step()
        bare_step()
    t_learner, t_bare = [], []
    for i in range(args.steps):
        if i % 2 == 0:
            t_learner.append(timed(learner_step))
            t_bare.append(timed(bare_step))
        else:
            t_bare.append(timed(bare_step))
            t_learner.append(timed(learner_step))
    med_l, med_b = statistics.median(t_learner), statistics.median(t_bare)
    ratio = med_l / med_b
    n_params = sum(p.numel() for p in params)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"torch {torch.__version__} device={device} ({card}) cores={os.cpu_count()} threads={torch.get_num_threads()}")
    print(f"model: SD3 transformer {args.layers} layers, width {args.heads * args.head_dim}, "
          f"{n_params / 1e6:.2f} M trainable ({f'LoRA r={args.lora_rank}' if args.lora_rank else 'full FT'}), "
          f"batch {b} x 4x{h}x{h} latents, autocast={learner.autocast_dtype}")
    print(f"steps={args.steps} warmup={args.warmup} (interleaved, medians)")
    print(f"learner.train_step: median {med_l * 1e3:.2f} ms  (min {min(t_learner) * 1e3:.2f})")
    print(f"bare torch loop:    median {med_b * 1e3:.2f} ms  (min {min(t_bare) * 1e3:.2f})")
    print(f"learner_step_ms {med_l * 1e3:.3f}  bare_step_ms {med_b * 1e3:.3f}")
    print(f"RESULT learner_step_ratio {ratio:.3f} target={TARGET:.2f} ok={'true' if ratio <= TARGET else 'false'}")
    return ratio


if __name__ == "__main__":
    main()
