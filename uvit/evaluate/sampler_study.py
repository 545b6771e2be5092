"""The sampler study: FID and conditional accuracy against NFE, for every sampler and time grid.

A point of the study is a sampler setting (sampler, time grid, steps) and a seed. Each point draws
the samples the sample stage would draw with that setting and seed (same per-sample seeds, labels,
guidance, count and batch size), so the reference point at the sample stage's own setting and
seed reproduces the score stage's FID. Scores are in the digits classifier's feature space,
against the real train split (its statistics computed once).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from uvit.config import BenchmarkConfig, SamplerStudyConfig
from uvit.paths import BenchmarkPaths

__all__ = [
    "Setting",
    "cheapest_within",
    "fid_bar",
    "load_results",
    "run_study",
    "settings",
    "steps_for_nfe",
    "summarize",
    "write_results",
]


@dataclass(frozen=True)
class Setting:
    """One sampler setting: `skip_type` None is the sampler's own (the paper protocol's) grid."""

    sampler: str
    steps: int
    skip_type: str | None = None
    reference: bool = False

    def kwargs(self) -> dict:
        return {"skip_type": self.skip_type} if self.skip_type else {}

    @property
    def nfe(self) -> int:
        from uvit.diffusion import count_nfe

        return count_nfe(self.sampler, self.steps, **self.kwargs())


def steps_for_nfe(sampler: str, nfe: int, skip_type: str | None = None) -> int:
    """The steps at which `sampler` makes exactly `nfe` network calls (ValueError if none does)."""
    from uvit.diffusion import count_nfe

    kw = {"skip_type": skip_type} if skip_type else {}
    for steps in range(1, nfe + 1):
        if count_nfe(sampler, steps, **kw) == nfe:
            return steps
    raise ValueError(f"{sampler} makes no run of exactly {nfe} network calls")


def settings(study: SamplerStudyConfig) -> list[Setting]:
    """The reference first, then every sampler x time grid x NFE."""
    ref = study.reference
    out = [Setting(ref.sampler, ref.steps, ref.skip_type, reference=True)]
    for sampler in study.samplers:
        for skip in study.skip_types:
            out += [Setting(sampler, steps_for_nfe(sampler, n, skip), skip) for n in study.nfe]
    return out


def run_study(cfg: BenchmarkConfig, paths: BenchmarkPaths, progress: bool = True) -> pd.DataFrame:
    """One row per setting and seed: sampler, skip_type, steps, nfe, reference, seed, fid,
    conditional_accuracy (no timings: the rows are a function of the weights and the settings)."""
    import torch
    from tqdm import tqdm

    from uvit.data.shards import load_split_arrays
    from uvit.evaluate.classifier import conditional_accuracy, load_classifier
    from uvit.evaluate.draw import device_for, sample_labels
    from uvit.evaluate.fid import FeatureSpace, fid_from_statistics, fid_statistics
    from uvit.evaluate.sample import Condition, SamplingRecipe, generate, sample_seeds, to_uint8
    from uvit.models import UViT

    study, s = cfg.sampler_study, cfg.sample
    if study is None:
        raise ValueError(f"{cfg.name} has no sampler_study block in params.yaml")
    if cfg.score.feature_extractor != "digits-classifier":
        raise NotImplementedError(
            f"{cfg.name}: the sampler study scores in the digits classifier's feature space; "
            "it is not wired for Inception benchmarks"
        )
    torch.set_num_threads(max(1, cfg.train.threads_per_worker))
    model = UViT.from_pretrained(paths.train / ("ema" if s.use_ema else "model")).eval()
    space = FeatureSpace("digits-classifier", classifier_path=paths.classifier)
    train_x, _ = load_split_arrays(paths.data / "train")
    mu_real, sigma_real = fid_statistics(train_x, space)
    classifier = load_classifier(paths.classifier)
    labels = sample_labels(cfg, s.num_samples)
    points = [(setting, seed) for setting in settings(study) for seed in study.seeds]
    rows = []
    for setting, seed in tqdm(points, desc=f"sampler study {cfg.name}", unit="point", disable=not progress, ascii=True):
        recipe = SamplingRecipe(
            cfg.diffusion.schedule, setting.sampler, setting.steps, s.guidance_scale, setting.kwargs()
        )
        seeds = sample_seeds(seed, s.num_samples)
        x = generate(
            model, recipe, seeds, Condition(labels), batch_size=s.batch_size, device=device_for(cfg), progress=False
        )
        images = to_uint8(x)
        fid = fid_from_statistics(*fid_statistics(images, space), mu_real, sigma_real)
        accuracy = conditional_accuracy(classifier, images, labels.numpy()) if labels is not None else None
        rows.append(
            {
                "sampler": setting.sampler,
                "skip_type": setting.skip_type or "default",
                "steps": setting.steps,
                "nfe": setting.nfe,
                "reference": setting.reference,
                "seed": seed,
                "fid": fid,
                "conditional_accuracy": accuracy,
            }
        )
    return pd.DataFrame(rows)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample standard deviation and count over seeds of FID and conditional accuracy, one row
    per setting (reference first, then by sampler, grid and NFE)."""
    keys = ["reference", "sampler", "skip_type", "steps", "nfe"]
    g = results.groupby(keys, sort=False)
    out = g.agg(
        fid_mean=("fid", "mean"),
        fid_std=("fid", "std"),
        accuracy_mean=("conditional_accuracy", "mean"),
        accuracy_std=("conditional_accuracy", "std"),
        seeds=("seed", "count"),
    ).reset_index()
    return out.sort_values(
        ["reference", "sampler", "skip_type", "nfe"], ascending=[False, True, True, True], kind="stable"
    ).reset_index(drop=True)


def cheapest_within(summary: pd.DataFrame, tolerance: float) -> pd.Series | None:
    """The study setting with the fewest network calls whose mean FID is at most (1 + tolerance)
    times the reference's mean FID (ties: the lower mean FID); None when no setting is."""
    ok = summary[~summary["reference"] & (summary["fid_mean"] <= fid_bar(summary, tolerance))]
    if ok.empty:
        return None
    return ok.sort_values(["nfe", "fid_mean"], kind="stable").iloc[0]


def write_results(results: pd.DataFrame, path: Path) -> Path:
    """results.csv: one row per setting and seed (floats at full precision)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    results.to_csv(path, index=False, float_format="%.10g")
    return path


def load_results(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path)
    frame["reference"] = frame["reference"].astype(bool)
    return frame


def fid_bar(summary: pd.DataFrame, tolerance: float) -> float:
    """The FID a setting must not exceed: the reference's mean FID times (1 + tolerance)."""
    ref = summary[summary["reference"]]
    if len(ref) != 1:
        raise ValueError(f"expected one reference row, found {len(ref)}")
    return float(ref["fid_mean"].iloc[0]) * (1 + tolerance)
