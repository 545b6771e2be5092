#!/usr/bin/env python
"""Sampling throughput (images/s) of U-ViT presets per sampler: batched CFG vs two passes.

For each preset and sampler, three variants sample one batch from noise with the same model:

    no_cfg        one forward of batch B per network evaluation (conditional only): the baseline
    cfg_batched   classifier-free guidance as the official scripts and uvit.diffusion.guidance
                  do it: ONE forward of the doubled batch 2B (conditional ‖ unconditional)
    cfg_two_pass  guidance with two separate forwards of batch B (conditional, then unconditional)

Each variant's images/s is reported as a ratio against the baseline measured in the same run,
so figures from different machines or loads are never compared directly. Weights are random
(speed does not depend on them); labels / CLIP contexts are random too. The VAE decoder of the
latent presets is not included (as in the paper's GFLOPs). Pixel presets without classes have no
guidance: only no_cfg is run for them.

    python benchmarks/sampling_throughput.py                      # U-ViT-H/2, 50 DPM-Solver++ steps, batch 256
    python benchmarks/sampling_throughput.py --device cuda --dtype bf16 --json h2.json
    python benchmarks/sampling_throughput.py --presets digits_uvit_tiny,mscoco256_uvit_s2 \
        --samplers dpm_solver_pp,dpm_solver_pp_2m --steps 10 --batch-size 4 --device cpu --threads 1

With --nfe-sweep, each preset instead samples once per (sampler, NFE) with the paper's guidance
(cfg_batched for a conditional preset, else no_cfg), and each images/s is a ratio against the
preset's paper protocol (PAPER_PROTOCOL: Euler-Maruyama x1000 for CIFAR-10 / CelebA, DPM-Solver x50
for the other pixel models, DPM-Solver++ x50 for the latent ones) measured in the same run:

    python benchmarks/sampling_throughput.py --nfe-sweep --presets imagenet256_uvit_h2 \
        --samplers dpm_solver_pp_2m,dpm_solver_pp_3m,unipc_bh2 --nfe 8,12,25,50 --device cuda

Imports only torch, uvit.models, uvit.diffusion and the standard library.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this script
from _common import make_parser, resolve_device, sync, write_json

from uvit.diffusion import (
    ALL_SAMPLERS,
    PerSampleNoise,
    classifier_free_guidance,
    count_nfe,
    make_schedule,
    sample,
    wrap_model,
)
from uvit.models import PRESETS, UViT, UViTConfig, get_preset

BASELINE = "no_cfg"
VARIANTS = ("no_cfg", "cfg_batched", "cfg_two_pass")
NoiseModel = Callable[[Tensor, Tensor], Tensor]
# The official evaluation sampler and steps per benchmark (pixel models not listed: DPM-Solver x50).
PAPER_PROTOCOL: dict[str, tuple[str, int]] = {"cifar10": ("euler_maruyama", 1000), "celeba64": ("euler_maruyama", 1000)}


def schedule_for(preset: str) -> str:
    """The diffusion schedule a preset is trained with: discrete for latent models, VP SDE for pixels."""
    return "discrete" if get_preset(preset).config.in_chans == 4 else "vpsde"


def paper_protocol(preset: str) -> tuple[str, int]:
    """(sampler, steps) of the paper's evaluation of a preset's benchmark."""
    if get_preset(preset).benchmark in PAPER_PROTOCOL:
        return PAPER_PROTOCOL[get_preset(preset).benchmark]
    return ("dpm_solver_pp", 50) if schedule_for(preset) == "discrete" else ("dpm_solver", 50)


def conditions(
    config: UViTConfig, batch_size: int, device: torch.device | str, seed: int = 0
) -> tuple[dict[str, Tensor], dict[str, Tensor]] | None:
    """(cond, uncond) model keyword tensors of a random batch, or None for an unconditional model.
    Class models: y (B,) real classes vs the null class (the last); text models: context
    (B, 77, D) vs one empty context (1, 77, D), broadcast by the guidance wrapper."""
    g = torch.Generator().manual_seed(seed)
    if config.num_classes > 0:
        y = torch.randint(0, config.num_classes - 1, (batch_size,), generator=g)
        return {"y": y.to(device)}, {"y": torch.full_like(y, config.num_classes - 1).to(device)}
    if config.clip_dim is not None:
        shape = (config.num_text_tokens, config.clip_dim)
        return (
            {"context": torch.randn(batch_size, *shape, generator=g).to(device)},
            {"context": torch.randn(1, *shape, generator=g).to(device)},
        )
    return None


def guided_net(
    model: UViT, variant: str, scale: float, cond: dict[str, Tensor] | None, uncond: dict[str, Tensor] | None
) -> NoiseModel:
    """NoiseModel(x, model_time) -> eps for one variant (VARIANTS)."""
    if variant == "no_cfg":
        return (lambda x, t: model(x, t, **cond)) if cond is not None else model
    if cond is None:
        raise ValueError("guidance needs a conditional model")
    if variant == "cfg_batched":
        return classifier_free_guidance(model, scale, cond, uncond)
    if variant == "cfg_two_pass":

        def two_pass(x: Tensor, t: Tensor) -> Tensor:
            b = x.shape[0]
            u = {k: v.expand(b, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in uncond.items()}
            eps_c = model(x, t, **cond)
            eps_u = model(x, t, **u)
            return eps_c + scale * (eps_c - eps_u)

        return two_pass
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


@dataclass(frozen=True)
class Job:
    """One measurement: `sampler` x `steps` over a batch of `batch_size`, guided as `variant` with
    `scale`, on the preset's `schedule` ("discrete" or "vpsde")."""

    variant: str
    sampler: str
    steps: int
    batch_size: int
    scale: float
    schedule: str


@dataclass(frozen=True)
class Timing:
    """How every job is timed: on `device` in `dtype` ("fp32", or "bf16" autocast), `warmup`
    untimed then `iters` timed batches; `seed` draws the noise and the conditions."""

    device: torch.device
    dtype: str = "fp32"
    iters: int = 3
    warmup: int = 1
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: torch.device) -> Timing:
        return cls(device, dtype=args.dtype, iters=args.iters, warmup=args.warmup, seed=args.seed)


@torch.no_grad()
def time_sampling(model: UViT, job: Job, timing: Timing) -> dict:
    """Median seconds to sample one batch (all `steps`), images/s, NFE, and peak CUDA memory."""
    c, device, seed, batch_size = model.config, timing.device, timing.seed, job.batch_size
    cond = conditions(c, batch_size, device, seed)
    net = guided_net(model, job.variant, job.scale, *(cond or (None, None)))
    sched = make_schedule(job.schedule)
    x_T = torch.randn(batch_size, c.in_chans, c.img_size, c.img_size, generator=torch.Generator().manual_seed(seed)).to(
        device
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=timing.dtype == "bf16")

    def run() -> Tensor:
        # Euler-Maruyama draws its increments per sample on CPU, as the sampling stage does
        noise = PerSampleNoise(range(seed, seed + batch_size), device) if job.sampler == "euler_maruyama" else None
        with autocast:
            return sample(job.sampler, wrap_model(net, sched), sched, x_T, job.steps, noise=noise)

    for _ in range(timing.warmup):
        run()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(timing.iters):
        sync(device)
        t0 = time.perf_counter()
        x = run()
        sync(device)
        times.append(time.perf_counter() - t0)
    if not torch.isfinite(x.float()).all():
        raise RuntimeError(f"{job.variant}: non-finite samples")
    med = statistics.median(times)
    nfe = count_nfe(job.sampler, job.steps)
    forwards = nfe * (2 if job.variant == "cfg_two_pass" else 1)
    return {
        "variant": job.variant,
        "sampler": job.sampler,
        "steps": job.steps,
        "nfe": nfe,
        "forwards": forwards,
        "forward_batch": batch_size * (2 if job.variant == "cfg_batched" else 1),
        "batch_size": batch_size,
        "batch_s_median": med,
        "batch_s_all": times,
        "images_per_s": batch_size / med,
        "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def measure(model: UViT, job: Job, timing: Timing, row: dict) -> dict:
    """`row` updated with time_sampling's figures and error None, or, when the job fails (e.g.
    CUDA out of memory: reported, the run goes on), with the error and no figures."""
    try:
        row.update(time_sampling(model, job, timing))
        row["error"] = None
    except (RuntimeError, ValueError) as e:
        failed = {"variant": job.variant, "sampler": job.sampler, "steps": job.steps, "nfe": None}
        row.update(failed, images_per_s=None, error=str(e)[:200])
    return row


def build_model(preset: str, device: torch.device, seed: int = 0) -> UViT:
    torch.manual_seed(seed)
    return UViT(get_preset(preset).config).to(device).eval().requires_grad_(False)


def run_jobs(
    preset: str, jobs: list[tuple[Job, dict, bool]], ratio_key: str, args: argparse.Namespace, device: torch.device
) -> list[dict]:
    """Time every (job, extra row fields, is a baseline) on one model of `preset`, in order; each
    row's `ratio_key` is its images/s over that of the latest baseline job."""
    model = build_model(preset, device, args.seed)
    timing = Timing.from_args(args, device)
    rows, base = [], None
    for job, extra, is_base in jobs:
        row = measure(model, job, timing, {"preset": preset, "schedule": job.schedule, "dtype": args.dtype, **extra})
        ips = row.get("images_per_s")
        if is_base:
            base = ips
        row[ratio_key] = ips / base if ips and base else None
        rows.append(row)
        print(
            f"  {preset} {job.sampler} x{job.steps} {job.variant}: "
            + (f"{ips:.3g} img/s" if ips else f"error {row['error']}"),
            file=sys.stderr,
        )
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run_preset(preset: str, samplers: list[str], args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Every sampler x variant of one preset; ratios against no_cfg of the same preset and sampler."""
    schedule = schedule_for(preset)
    conditional = conditions(get_preset(preset).config, 1, "cpu") is not None
    jobs = [
        (Job(variant, sampler, args.steps, args.batch_size, args.guidance_scale, schedule), {}, variant == BASELINE)
        for sampler in samplers
        if not (sampler == "euler_maruyama" and schedule == "discrete")  # SDE: continuous models only
        for variant in (VARIANTS if conditional else (BASELINE,))
    ]
    return run_jobs(preset, jobs, f"ratio_vs_{BASELINE}", args, device)


def sweep_variant(config: UViTConfig, scale: float) -> str:
    """The paper's guidance for a sweep: one batched CFG forward when there is a condition."""
    return "cfg_batched" if conditions(config, 1, "cpu") is not None and scale > 0 else BASELINE


def run_nfe_sweep(
    preset: str, samplers: list[str], nfes: list[int], args: argparse.Namespace, device: torch.device
) -> list[dict]:
    """The paper protocol first, then every sampler at every NFE (steps = NFE: no final denoising);
    ratio_vs_paper = images/s over the protocol's images/s from this same run."""
    schedule = schedule_for(preset)
    variant = sweep_variant(get_preset(preset).config, args.guidance_scale)
    protocol = tuple(args.protocol.split(":")) if args.protocol else paper_protocol(preset)
    runs = [("paper", protocol[0], int(protocol[1]))]
    runs += [
        ("sweep", s, n) for s in samplers for n in nfes if not (s == "euler_maruyama" and schedule == "discrete")
    ]  # SDE: continuous models only
    jobs = [
        (Job(variant, sampler, steps, args.batch_size, args.guidance_scale, schedule), {"role": role}, role == "paper")
        for role, sampler, steps in runs
    ]
    return run_jobs(preset, jobs, "ratio_vs_paper", args, device)


def format_sweep_table(rows: list[dict]) -> str:
    head = (
        f"{'preset':<24} {'sampler':<17} {'NFE':>5} {'variant':<12} {'s/batch':>9} {'img/s':>9} "
        f"{'x paper':>8} {'paper NFE/NFE':>13}"
    )
    lines = [head, "-" * len(head)]
    paper_nfe = None
    for r in rows:
        name = r["sampler"] + (" (paper)" if r["role"] == "paper" else "")
        if r.get("error"):
            lines.append(f"{r['preset']:<24} {name:<17} {r['steps']:>5} {r['variant']:<12} error: {r['error']}")
            continue
        if r["role"] == "paper":
            paper_nfe = r["nfe"]
        ratio = r["ratio_vs_paper"]
        ideal = f"{paper_nfe / r['nfe']:>12.2f}x" if paper_nfe else f"{'':>13}"
        lines.append(
            f"{r['preset']:<24} {name:<17} {r['nfe']:>5} {r['variant']:<12} {r['batch_s_median']:>9.3f} "
            f"{r['images_per_s']:>9.3g} " + (f"{ratio:>7.2f}x" if ratio else f"{'-':>8}") + f" {ideal}"
        )
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'preset':<24} {'sampler':<17} {'NFE':>4} {'variant':<13} {'fwd batch':>9} {'s/batch':>9} "
        f"{'img/s':>9} {'x no_cfg':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['preset']:<24} {r['sampler']:<17} {'':>4} {r['variant']:<13} error: {r['error']}")
            continue
        ratio = r[f"ratio_vs_{BASELINE}"]
        lines.append(
            f"{r['preset']:<24} {r['sampler']:<17} {r['nfe']:>4} {r['variant']:<13} {r['forward_batch']:>9} "
            f"{r['batch_s_median']:>9.3f} {r['images_per_s']:>9.3g} {ratio:>8.2f}x"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    p.add_argument("--presets", default="imagenet256_uvit_h2", help="comma-separated preset names")
    p.add_argument("--samplers", default="dpm_solver_pp", help=f"comma-separated, from {sorted(ALL_SAMPLERS)}")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (DPM-Solver: NFE 50 at 50 steps)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (CFG doubles the forward batch)")
    p.add_argument("--guidance-scale", type=float, default=0.4, help="s in (1+s)·eps_c − s·eps_u")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast (CUDA)")
    p.add_argument("--iters", type=int, default=3, help="timed batches per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches per variant")
    p.add_argument(
        "--nfe-sweep",
        action="store_true",
        help="images/s of each sampler at each --nfe, as ratios against the paper protocol",
    )
    p.add_argument("--nfe", default="8,12,25,50", help="--nfe-sweep: comma-separated NFEs (= steps)")
    p.add_argument(
        "--protocol",
        default=None,
        metavar="SAMPLER:STEPS",
        help="--nfe-sweep: the baseline instead of the preset's paper protocol (e.g. for a quick CPU run)",
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 variants: TF32 matmuls, as training does on GPU
    presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    for name in presets:
        if name not in PRESETS:
            raise SystemExit(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    protocol_sampler = []
    if args.protocol:
        name, _, steps = args.protocol.partition(":")
        if not steps.isdigit() or int(steps) < 1:
            raise SystemExit(f"--protocol must be SAMPLER:STEPS, got {args.protocol!r}")
        protocol_sampler = [name]
    for name in samplers + protocol_sampler:
        if name not in ALL_SAMPLERS:
            raise SystemExit(f"unknown sampler {name!r}; choose from {', '.join(sorted(ALL_SAMPLERS))}")
    nfes = [int(n) for n in args.nfe.split(",") if n.strip()]
    if args.nfe_sweep:
        if not nfes or min(nfes) < 1:
            raise SystemExit(f"--nfe must list positive integers, got {args.nfe!r}")
        rows = [r for preset in presets for r in run_nfe_sweep(preset, samplers, nfes, args, device)]
    else:
        rows = [r for preset in presets for r in run_preset(preset, samplers, args, device)]
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "dtype": args.dtype,
        "iters": args.iters,
        "warmup": args.warmup,
        "argv": sys.argv[1:] if argv is None else argv,
    }
    if args.nfe_sweep:
        meta.update(
            mode="nfe_sweep",
            nfe=nfes,
            protocol={p: list(paper_protocol(p)) for p in presets} if not args.protocol else args.protocol,
        )
    result = {"meta": meta, "results": rows}
    if args.nfe_sweep:
        print(
            f"sampling throughput vs NFE on {meta['device']} ({meta['threads']} threads), batch {args.batch_size}, "
            f"guidance {args.guidance_scale}, {args.dtype}"
        )
        print(format_sweep_table(rows))
    else:
        print(
            f"sampling throughput on {meta['device']} ({meta['threads']} threads), batch {args.batch_size}, "
            f"{args.steps} steps, guidance {args.guidance_scale}, {args.dtype}"
        )
        print(format_table(rows))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
