#!/usr/bin/env python
"""Training-step throughput of a U-ViT preset: eager vs compiled, fp32 vs bf16 autocast.

One training step = forward + MSE loss against a random target + backward + AdamW.step()
+ zero_grad(set_to_none=True). Every variant is measured in the same run as the plain eager
fp32 step of the same model (the baseline), and reported as a ratio against it, so numbers
from different machines or loads are never compared directly.

    python benchmarks/model_throughput.py                         # cifar10_uvit_s2, batch 32
    python benchmarks/model_throughput.py --preset imagenet256_uvit_h2 --batch-size 64 \
        --checkpointing --fused-adamw --tf32 --json out.json

Variant names: a base (eager_fp32, compiled_fp32, eager_bf16, compiled_bf16) plus optional
modifiers joined with '+': ckpt / nockpt (force the blocks' activation checkpointing on /
off; without either the preset's own use_checkpoint is kept), fused (AdamW(fused=True)
instead of the default implementation), tf32 (TF32 matmuls, CUDA only), e.g.
`compiled_bf16+fused`. See benchmarks/README.md for the columns and the MFU convention.

Imports only torch, uvit.models and the standard library; stable torch APIs only (runs on
torch 2.11+).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this script
from _common import make_parser, resolve_device, write_json
from _common import sync as _sync

from uvit.models import PRESETS, UViT, UViTConfig, count_macs, count_params, get_preset

BASELINE = "eager_fp32"
BASES = ("eager_fp32", "compiled_fp32", "eager_bf16", "compiled_bf16")
MODIFIERS = ("ckpt", "nockpt", "fused", "tf32")
NUM_TIMESTEPS = 999  # t ~ U[0, 999): the model time of the continuous VP SDE (999 * t)

# Dense peak tensor-core throughput, FLOP/s: (bf16, tf32). First matching substring of
# torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100 80GB HBM3", 989e12, 494e12),  # H100 SXM's reported name
    ("H100 SXM", 989e12, 494e12),
    ("H100", 989e12, 494e12),
    ("H200", 989e12, 494e12),  # same compute as H100 SXM
    ("A100", 312e12, 156e12),
)


# --------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    name: str
    compiled: bool
    amp: str  # "fp32" or "bf16"
    checkpoint: bool | None  # None: the preset's own use_checkpoint
    fused_adamw: bool
    tf32: bool

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.amp == "bf16" else None


def parse_variant(name: str) -> Variant:
    """'compiled_bf16+fused' -> Variant(...). Raises ValueError on an unknown name."""
    base, *mods = name.strip().split("+")
    if base not in BASES:
        raise ValueError(f"unknown variant base {base!r} in {name!r}; choose from {', '.join(BASES)}")
    bad = [m for m in mods if m not in MODIFIERS]
    if bad:
        raise ValueError(f"unknown variant modifier(s) {bad} in {name!r}; choose from {', '.join(MODIFIERS)}")
    if "ckpt" in mods and "nockpt" in mods:
        raise ValueError(f"{name!r}: ckpt and nockpt exclude each other")
    mode, amp = base.split("_")
    ckpt = True if "ckpt" in mods else False if "nockpt" in mods else None
    return Variant(
        name=name.strip(),
        compiled=mode == "compiled",
        amp=amp,
        checkpoint=ckpt,
        fused_adamw="fused" in mods,
        tf32="tf32" in mods,
    )


def default_variants(device: torch.device | str, compile: bool = True) -> list[str]:
    """All base variants that apply to the device: fp32 everywhere, bf16 autocast on CUDA."""
    cuda = torch.device(device).type == "cuda"
    names = ["eager_fp32", "compiled_fp32"]
    if cuda:
        names += ["eager_bf16", "compiled_bf16"]
    return [n for n in names if compile or not n.startswith("compiled")]


def expand_variants(
    names: list[str],
    preset_checkpoint: bool,
    *,
    checkpointing: bool = False,
    fused_adamw: bool = False,
    tf32: bool = False,
    compile: bool = True,
) -> list[str]:
    """The baseline first, then each listed variant followed by the flag-driven extras:
    the opposite of the preset's checkpointing (--checkpointing), fused AdamW
    (--fused-adamw), TF32 matmuls for fp32 variants (--tf32). Duplicates are dropped."""
    out: list[str] = [BASELINE]
    for name in names:
        v = parse_variant(name)
        if v.compiled and not compile:
            continue
        out.append(name)
        mods = name.split("+")[1:]
        if checkpointing and v.checkpoint is None:
            out.append(name + ("+nockpt" if preset_checkpoint else "+ckpt"))
        if fused_adamw and not v.fused_adamw:
            out.append(name + "+fused")
        if tf32 and v.amp == "fp32" and not v.tf32 and "tf32" not in mods:
            out.append(name + "+tf32")
    return list(dict.fromkeys(out))


# --------------------------------------------------------------------------- inputs / step
def make_inputs(
    config: UViTConfig, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
) -> tuple[dict[str, Tensor], Tensor]:
    """Random model inputs of the preset's shape and a random regression target.

    Returns (kwargs for UViT.forward, target): x (B, C, H, W) ~ N(0, 1); t ~ U[0, 999);
    y (B,) class labels when num_classes > 0; context (B, 77, 768) when clip_dim is set.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    B, C, S = batch_size, config.in_chans, config.img_size
    inputs: dict[str, Tensor] = {
        "x": torch.randn(B, C, S, S, generator=g),
        "t": torch.rand(B, generator=g) * NUM_TIMESTEPS,
    }
    if config.num_classes > 0:
        inputs["y"] = torch.randint(0, config.num_classes, (B,), generator=g)
    if config.clip_dim is not None:
        inputs["context"] = torch.randn(B, config.num_text_tokens, config.clip_dim, generator=g)
    target = torch.randn(B, C, S, S, generator=g)
    return {k: v.to(device) for k, v in inputs.items()}, target.to(device)


def train_step_fn(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: dict[str, Tensor],
    target: Tensor,
    amp_dtype: torch.dtype | None = None,
) -> Callable[[], None]:
    """A closure running one full training step (forward, MSE loss, backward, AdamW step,
    zero_grad(set_to_none=True)). `model` may be a torch.compile'd module."""
    device_type = target.device.type

    def step() -> None:
        with torch.autocast(device_type=device_type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            out = model(**inputs)
        loss = (out.float() - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# --------------------------------------------------------------------------- memory helpers
def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        try:  # hand freed heap pages back to the OS, so the next RSS delta starts low
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # kB on Linux, bytes on macOS


def _reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _PeakMemory:
    """CUDA: torch.cuda.max_memory_allocated, reset per variant (bytes, exact for torch's
    allocator). CPU: growth of the process's peak RSS over the variant (approximate: it
    includes allocator slack and anything else the process touches)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss_delta"
        self.reset_ok = True

    def start(self) -> None:
        _free_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.reset_ok = _reset_peak_rss()
        current = _current_rss_bytes() if self.reset_ok else None
        # Without a reset the high-water mark is the process's whole past: deltas can read 0.
        self.start_bytes = current if current is not None else _peak_rss_bytes()

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return max(0, _peak_rss_bytes() - self.start_bytes)


# --------------------------------------------------------------------------- timing
def _set_tf32(on: bool) -> str:
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if on else "highest")
    return previous


def build_model(
    config: UViTConfig, variant: Variant, device: torch.device, seed: int = 0
) -> tuple[torch.nn.Module, UViT, torch.optim.Optimizer]:
    """(callable model, the underlying UViT, AdamW), identical weights for every variant."""
    if variant.checkpoint is not None:
        config = dataclasses.replace(config, use_checkpoint=variant.checkpoint)
    torch.manual_seed(seed)
    model = UViT(config).to(device).train()
    opt_kwargs = {"fused": True} if variant.fused_adamw else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.03, betas=(0.99, 0.999), **opt_kwargs)
    runner: torch.nn.Module = torch.compile(model) if variant.compiled else model
    return runner, model, optimizer


def _warm_up(step: Callable[[], None], n: int, compiled: bool, device: torch.device) -> tuple[float | None, float]:
    """Run `n` untimed steps: (compile_s, the first step's seconds for a compiled variant, else
    None; warmup_s, all n steps' seconds)."""
    compile_s = None
    _sync(device)
    t0 = time.perf_counter()
    for i in range(n):
        step()
        if i == 0 and compiled:
            _sync(device)
            compile_s = time.perf_counter() - t0
    _sync(device)
    return compile_s, time.perf_counter() - t0


def _timed_steps(step: Callable[[], None], iters: int, device: torch.device) -> tuple[list[float], float]:
    """Run `iters` timed steps: (each step's seconds, by CUDA events on a GPU, else wall clock;
    the whole loop's wall-clock seconds)."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        _sync(device)
        t0 = time.perf_counter()
        for start, end in events:
            start.record()
            step()
            end.record()
        _sync(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events], time.perf_counter() - t0
    step_s = []
    t0 = time.perf_counter()
    for _ in range(iters):
        s = time.perf_counter()
        step()
        step_s.append(time.perf_counter() - s)
    return step_s, time.perf_counter() - t0


def time_variant(
    config: UViTConfig,
    variant: Variant | str,
    *,
    batch_size: int,
    iters: int,
    warmup: int,
    device: torch.device | str,
    seed: int = 0,
) -> dict:
    """Measure one variant: a fresh model (same seed), `warmup` untimed steps (for a compiled
    variant at least one, whose time is reported as compile_s), then `iters` timed steps.

    Returns a result row (plain JSON types): step times in ms (median, mean, min), images/s
    over the whole timed loop, peak memory bytes, warm-up/compile seconds.
    """
    v = parse_variant(variant) if isinstance(variant, str) else variant
    device = torch.device(device)
    if iters < 1:
        raise ValueError("iters must be >= 1")
    if v.tf32 and device.type != "cuda":
        raise ValueError(f"{v.name}: TF32 needs a CUDA device")
    cuda = device.type == "cuda"
    if v.compiled:
        torch.compiler.reset()  # every compiled variant pays its own compile
    memory = _PeakMemory(device)
    memory.start()
    previous_precision = _set_tf32(v.tf32) if cuda else None
    try:
        runner, model, optimizer = build_model(config, v, device, seed)
        inputs, target = make_inputs(config, batch_size, device)
        step = train_step_fn(runner, optimizer, inputs, target, v.amp_dtype)

        n_warmup = max(warmup, 1 if v.compiled else 0)
        compile_s, warmup_s = _warm_up(step, n_warmup, v.compiled, device)
        step_s, total_s = _timed_steps(step, iters, device)
        peak = memory.peak()
        n_params = model.num_parameters()
        del runner, model, optimizer, inputs, target, step
    finally:
        if previous_precision is not None:
            torch.set_float32_matmul_precision(previous_precision)
        _free_memory(device)

    return {
        "variant": v.name,
        "compiled": v.compiled,
        "amp": v.amp,
        "checkpoint": config.use_checkpoint if v.checkpoint is None else v.checkpoint,
        "fused_adamw": v.fused_adamw,
        "tf32": v.tf32,
        "params": n_params,
        "iters": iters,
        "warmup": n_warmup,
        "step_ms_median": statistics.median(step_s) * 1e3,
        "step_ms_mean": statistics.fmean(step_s) * 1e3,
        "step_ms_min": min(step_s) * 1e3,
        "total_s": total_s,
        "images_per_s": batch_size * iters / total_s,
        "peak_mem_bytes": peak,
        "peak_mem_kind": memory.kind if memory.reset_ok else memory.kind + "_no_reset",
        "warmup_s": warmup_s,
        "compile_s": compile_s,
        "error": None,
    }


def prime(config: UViTConfig, variants: list[str], device: torch.device | str) -> None:
    """One throwaway eager step per precision on a tiny model of the same kind, before any
    measurement: the process's one-time costs (kernel libraries loading, thread pools, cuBLAS
    handles and workspaces) then land on no variant, the baseline included."""
    device = torch.device(device)
    tiny = dataclasses.replace(config, embed_dim=64, depth=2, num_heads=2, use_checkpoint=False)
    specs = [parse_variant(n) for n in variants]
    for amp in dict.fromkeys(v.amp for v in specs):
        fused = any(v.fused_adamw for v in specs)
        v = Variant(name="prime", compiled=False, amp=amp, checkpoint=None, fused_adamw=fused, tf32=False)
        runner, model, optimizer = build_model(tiny, v, device)
        inputs, target = make_inputs(tiny, 2, device)
        train_step_fn(runner, optimizer, inputs, target, v.amp_dtype)()
        _sync(device)
        del runner, model, optimizer, inputs, target
    _free_memory(device)


# --------------------------------------------------------------------------- MFU
def peak_flops_for(device_name: str, override: str | None = None) -> tuple[float | None, float | None, str]:
    """(bf16 peak, tf32 peak, source) in FLOP/s. `override` is 'BF16[,TF32]' in TFLOP/s and
    replaces the table entirely (a missing TF32 figure leaves fp32 MFU blank)."""
    if override:
        parts = [float(p) * 1e12 for p in override.split(",") if p.strip()]
        if not 1 <= len(parts) <= 2:
            raise ValueError(f"--peak-tflops wants 'BF16[,TF32]', got {override!r}")
        return parts[0], (parts[1] if len(parts) == 2 else None), "--peak-tflops"
    for key, bf16, tf32 in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return bf16, tf32, f"table ({key})"
    return None, None, "unknown device (use --peak-tflops)"


def add_mfu(row: dict, train_flops_per_image: float, peak_bf16: float | None, peak_tf32: float | None) -> None:
    """MFU = images/s x training FLOPs/image / peak. bf16 variants against the bf16 peak, fp32
    ones (TF32 on or off) against the TF32 peak, labelled by mfu_peak."""
    peak, kind = (peak_bf16, "bf16") if row["amp"] == "bf16" else (peak_tf32, "tf32")
    row["achieved_tflops"] = row["images_per_s"] * train_flops_per_image / 1e12
    row["mfu"] = row["achieved_tflops"] * 1e12 / peak if peak else None
    row["mfu_peak"] = kind if peak else None


# --------------------------------------------------------------------------- report
def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_table(rows: list[dict]) -> str:
    headers = ["variant", "step ms (med)", "images/s", "x eager fp32", "peak mem", "mem x base", "MFU", "compile s"]
    lines = []
    for r in rows:
        if r.get("error"):
            lines.append([r["variant"], "failed: " + r["error"][:80], "", "", "", "", "", ""])
            continue
        mfu = f"{100 * r['mfu']:.1f}% ({r['mfu_peak']})" if r.get("mfu") is not None else "—"
        mem_ratio = r.get("peak_mem_ratio")
        lines.append(
            [
                r["variant"],
                f"{r['step_ms_median']:.2f}",
                f"{r['images_per_s']:.1f}",
                f"{r['ratio_vs_eager_fp32']:.2f}x",
                _fmt_bytes(r["peak_mem_bytes"]),
                f"{mem_ratio:.2f}x" if mem_ratio is not None else "—",
                mfu,
                f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "—",
            ]
        )
    ok = [line for line in lines if not line[1].startswith("failed")]  # failures span the row, unaligned
    widths = [
        max([len(h), *(len(line[i]) for line in ok)]) if i else max([len(h), *(len(line[0]) for line in lines)])
        for i, h in enumerate(headers)
    ]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [fmt(headers), "  ".join("-" * w for w in widths)]
    for line in lines:
        out.append(fmt(line) if not line[1].startswith("failed") else f"{line[0].ljust(widths[0])}  {line[1]}")
    return "\n".join(out)


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    p.add_argument(
        "--preset",
        default="cifar10_uvit_s2",
        choices=sorted(PRESETS),
        metavar="NAME",
        help="U-ViT preset (uvit.models.PRESETS)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--iters", type=int, default=10, help="timed iterations per variant")
    p.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed iterations per variant (a compiled variant runs at least 1: its compile)",
    )
    p.add_argument(
        "--variants",
        default=None,
        help=f"comma list of variants (bases {', '.join(BASES)}, modifiers +{', +'.join(MODIFIERS)}); "
        "default: every base that applies to the device. eager_fp32 always runs first as the baseline",
    )
    p.add_argument("--no-compile", action="store_true", help="drop the compiled variants")
    p.add_argument(
        "--checkpointing",
        action="store_true",
        help="also run each variant with the preset's activation checkpointing flipped",
    )
    p.add_argument("--fused-adamw", action="store_true", help="also run each variant with AdamW(fused=True)")
    p.add_argument("--tf32", action="store_true", help="also run each fp32 variant with TF32 matmuls (CUDA)")
    p.add_argument(
        "--peak-tflops", metavar="BF16[,TF32]", help="peak dense TFLOP/s for MFU, overriding the device table"
    )
    return p


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, torch.device, list[str]]:
    """(the checked options, the device, the variant names to run, the baseline first); sets
    torch's CPU threads."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.iters < 1 or args.warmup < 0:
        parser.error("--batch-size and --iters must be >= 1, --warmup >= 0")
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32 and device.type != "cuda":
        print("note: --tf32 ignored on CPU", file=sys.stderr)
        args.tf32 = False
    compile = not args.no_compile
    requested = (
        [n.strip() for n in args.variants.split(",") if n.strip()]
        if args.variants
        else default_variants(device, compile)
    )
    try:
        names = expand_variants(
            requested,
            get_preset(args.preset).config.use_checkpoint,
            checkpointing=args.checkpointing,
            fused_adamw=args.fused_adamw,
            tf32=args.tf32,
            compile=compile,
        )
        if args.peak_tflops:
            peak_flops_for("", args.peak_tflops)
    except ValueError as e:
        parser.error(str(e))
    return args, device, names


def run_meta(args: argparse.Namespace, device: torch.device, names: list[str]) -> dict:
    """The run's description: device, preset, sizes, FLOPs per image, MFU peaks, variants."""
    preset = get_preset(args.preset)
    config = preset.config
    macs = count_macs(config)
    train_flops = 3 * 2 * macs
    n_params = count_params(config)  # closed form, held to the official counts by tests/test_models.py
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    )
    peak_bf16, peak_tf32, peak_source = (
        peak_flops_for(device_name, args.peak_tflops) if device.type == "cuda" else (None, None, "n/a on CPU")
    )
    return {
        "device": str(device),
        "device_name": device_name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "preset": preset.name,
        "title": preset.title,
        "params": n_params,
        "macs_per_image": macs,
        "gmacs_per_image": macs / 1e9,
        "train_flops_per_image": train_flops,
        "batch_size": args.batch_size,
        "iters": args.iters,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "use_checkpoint_preset": config.use_checkpoint,
        "peak_bf16_flops": peak_bf16,
        "peak_tf32_flops": peak_tf32,
        "peak_source": peak_source,
        "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss_delta",
        "variants": names,
    }


def run_variants(config: UViTConfig, names: list[str], args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One result row per variant, in order; a variant that fails (no compiler, OOM) gets an
    error row, except the baseline, whose failure is raised."""
    rows: list[dict] = []
    for name in names:
        try:
            row = time_variant(
                config,
                name,
                batch_size=args.batch_size,
                iters=args.iters,
                warmup=args.warmup,
                device=device,
                seed=args.seed,
            )
        except Exception as e:  # one failing variant (no compiler, OOM) must not sink the others
            if name == BASELINE:
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            row = {
                "variant": name,
                "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
            }
        rows.append(row)
        status = row["error"] or f"{row['step_ms_median']:.2f} ms/step"
        print(f"  {name}: {status}", file=sys.stderr, flush=True)
    return rows


def add_ratios(rows: list[dict], meta: dict, device: torch.device) -> None:
    """Each row's images/s and peak memory against the baseline (rows[0]), and its MFU on CUDA."""
    train_flops, peak_bf16, peak_tf32 = meta["train_flops_per_image"], meta["peak_bf16_flops"], meta["peak_tf32_flops"]
    base = rows[0]
    for r in rows:
        if r.get("error"):
            continue
        r["ratio_vs_eager_fp32"] = 1.0 if r is base else r["images_per_s"] / base["images_per_s"]
        r["peak_mem_ratio"] = (
            1.0 if r is base else r["peak_mem_bytes"] / base["peak_mem_bytes"] if base["peak_mem_bytes"] else None
        )
        if device.type == "cuda":
            add_mfu(r, train_flops, peak_bf16, peak_tf32)
        else:
            r["achieved_tflops"] = r["images_per_s"] * train_flops / 1e12
            r["mfu"] = r["mfu_peak"] = None


def print_report(rows: list[dict], meta: dict, device: torch.device) -> None:
    """The table and what its columns mean."""
    train_flops, peak_bf16, peak_tf32 = meta["train_flops_per_image"], meta["peak_bf16_flops"], meta["peak_tf32_flops"]
    peak_source = meta["peak_source"]
    print()
    print(format_table(rows))
    print()
    print(
        "x eager fp32 = images/s / eager fp32 images/s in this run (>1: faster). images/s over the whole timed loop; "
        "step ms = median step."
    )
    if device.type == "cuda":
        print("peak mem = torch.cuda.max_memory_allocated, reset per variant.")
        bf = f"{peak_bf16 / 1e12:.0f}" if peak_bf16 else "?"
        tf = f"{peak_tf32 / 1e12:.0f}" if peak_tf32 else "?"
        print(
            f"MFU = images/s x {train_flops / 1e9:.2f} GFLOP/image (3 x 2 x MACs) / dense peak: bf16 variants vs "
            f"{bf} TFLOP/s bf16, fp32 variants vs {tf} TFLOP/s TF32 [{peak_source}]."
        )
    else:
        print(
            "peak mem = growth of the process's peak RSS (resource.getrusage ru_maxrss) over the variant: "
            "approximate (allocator slack included). MFU not reported on CPU."
        )


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print the table; return (and optionally write) the results dict."""
    args, device, names = parse_args(argv)
    config = get_preset(args.preset).config
    meta = run_meta(args, device, names)
    print(
        f"device {device} ({meta['device_name']}) | torch {torch.__version__} | preset {meta['preset']} ({meta['title']}): "
        f"{meta['params']:,} params, {meta['gmacs_per_image']:.3f} GMACs/image | batch {args.batch_size} | "
        f"threads {torch.get_num_threads()} | {args.iters} timed + {args.warmup} warm-up iters | "
        f"use_checkpoint={config.use_checkpoint} (preset)",
        flush=True,
    )
    prime(config, names, device)
    rows = run_variants(config, names, args, device)
    add_ratios(rows, meta, device)
    print_report(rows, meta, device)
    results = {"meta": meta, "results": rows}
    if args.json:
        write_json(args.json, results)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
