"""The design study's page (reports/ablations.md): per group, each variant's FID, FID/floor and
conditional accuracy as mean ± spread over training seeds, FID against training step, and the
paper's finding beside ours with a verdict.

A verdict compares means and spreads: a claim ("X is best", "X is worst", "larger is better")
*agrees* or *disagrees* when the two means it compares differ by more than the sum of their
standard deviations over seeds, and is *within the seed spread* otherwise: with two or three
seeds per variant, that is all such a study can say.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from uvit.report.plots import png_figure

AGREES, DISAGREES, UNCLEAR = "agrees", "disagrees", "within the seed spread"


@dataclass(frozen=True)
class StudyRun:
    """One training run of the study: its id, variant, seed and the folders of its train and score stages."""

    run: str
    variant: str
    seed: int
    train: Path
    score: Path


def paper_findings() -> dict[str, dict[str, Any]]:
    """The paper's finding per group (uvit/report/data/paper_ablations.yaml)."""
    text = resources.files("uvit.report").joinpath("data/paper_ablations.yaml").read_text()
    return yaml.safe_load(text)


def collect(runs: list[StudyRun]) -> pd.DataFrame:
    """One row per run: run, variant, seed, params, gmacs, steps, wall_time_s, fid, fid_floor,
    fid_over_floor, accuracy (the score stage's conditional accuracy). Every file must exist."""
    rows = []
    for r in runs:
        summary = json.loads((r.train / "summary.json").read_text())
        metrics = json.loads((r.score / "metrics.json").read_text())
        rows.append(
            {
                "run": r.run,
                "variant": r.variant,
                "seed": r.seed,
                "params": summary["params"],
                "gmacs": summary["gmacs"],
                "steps": summary["steps"],
                "wall_time_s": summary["wall_time_s"],
                "fid": metrics["fid"],
                "fid_floor": metrics["fid_floor"],
                "fid_over_floor": metrics["fid_over_floor"],
                "accuracy": metrics.get("conditional_accuracy"),
            }
        )
    return pd.DataFrame(rows)


def fid_curves(runs: list[StudyRun]) -> pd.DataFrame:
    """The periodic FID of every run (train/fid.csv): columns run, variant, seed, step, fid."""
    frames = []
    for r in runs:
        with (r.train / "fid.csv").open() as f:
            rows = [
                {"run": r.run, "variant": r.variant, "seed": r.seed, "step": int(x["step"]), "fid": float(x["fid"])}
                for x in csv.DictReader(f)
            ]
        frames.append(pd.DataFrame(rows, columns=["run", "variant", "seed", "step", "fid"]))
    return (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["run", "variant", "seed", "step", "fid"])
    )


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """One row per variant (first-seen order): seeds, params, gmacs and the mean and sample standard
    deviation over seeds of fid, fid_over_floor and accuracy (`<metric>_mean`, `<metric>_std`)."""
    grouped = results.groupby("variant", sort=False)
    out = grouped.agg(seeds=("seed", "count"), params=("params", "first"), gmacs=("gmacs", "first"))
    for metric in ("fid", "fid_over_floor", "accuracy"):
        out[f"{metric}_mean"] = grouped[metric].mean()
        out[f"{metric}_std"] = grouped[metric].std()
    return out


def _separated(a: pd.Series, b: pd.Series) -> bool:
    """Whether two variants' mean FIDs differ by more than the sum of their spreads."""
    return abs(a["fid_mean"] - b["fid_mean"]) > a["fid_std"] + b["fid_std"]


def verdict(
    group: str,
    variants: list[str],
    summary: pd.DataFrame,
    finding: dict[str, Any],
    base_model: dict[str, Any],
    overrides: dict[str, dict[str, Any]],
) -> tuple[str, str]:
    """(verdict, our finding in words) for a group's claim(s), from the variants' FID summary.

    `variants` are the group's labels (the default first), `overrides` each label's model overrides,
    `base_model` the benchmark's own UViTConfig values (what "default" is)."""
    rows = summary.loc[variants]
    value = (
        {v: (base_model[group] if v == "default" else overrides[v][group]) for v in variants}
        if group != "scaling"
        else {}
    )
    checks: list[tuple[str, bool, bool]] = []  # (claim, holds, separated)
    words = []
    best, worst = rows["fid_mean"].idxmin(), rows["fid_mean"].idxmax()
    if group == "scaling":
        default = rows.loc["default"]
        for v in variants[1:]:
            ((knob, val),) = overrides[v].items()
            better = finding["better"].get(knob)
            grew = val > base_model[knob]
            expect_lower = (better == "larger") == grew
            holds = (rows.loc[v, "fid_mean"] < default["fid_mean"]) == expect_lower
            direction = "larger" if grew else "smaller"
            checks.append((f"{knob} {val} ({direction})", holds, _separated(rows.loc[v], default)))
            words.append(
                f"{_name(group, v, base_model, overrides)}: FID {rows.loc[v, 'fid_mean']:.2f} against "
                f"{default['fid_mean']:.2f}"
            )
    else:
        words.append(
            f"best {value[best]} (FID {rows.loc[best, 'fid_mean']:.2f}), worst {value[worst]} "
            f"(FID {rows.loc[worst, 'fid_mean']:.2f})"
        )
        label = {value[v]: v for v in variants}
        for claim, ours in (("best", best), ("worst", worst)):
            theirs = finding.get(claim)
            if theirs is None or theirs not in label:
                continue
            holds = value[ours] == theirs
            other = (
                rows.loc[ours]
                if not holds
                else rows.drop(index=ours).sort_values("fid_mean", ascending=claim == "best").iloc[0]
            )
            checks.append((f"{theirs} {claim}", holds, _separated(rows.loc[label[theirs]], other)))
    if not checks:
        return UNCLEAR, "; ".join(words)
    if all(holds and sep for _, holds, sep in checks):
        result = AGREES
    elif any(not holds and sep for _, holds, sep in checks):
        result = DISAGREES
    else:
        result = UNCLEAR
    detail = ", ".join(
        f"{claim}: {'yes' if holds else 'no'}{'' if sep else ' (within spread)'}" for claim, holds, sep in checks
    )
    return result, f"{'; '.join(words)} ({detail})"


def _name(group: str, variant: str, base_model: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> str:
    """How a table names a variant: the switch value, or the scaling knob(s) and value(s)."""
    if group == "scaling":
        if variant == "default":
            return "default (" + ", ".join(f"{k} {base_model[k]}" for k in ("depth", "embed_dim", "patch_size")) + ")"
        return ", ".join(f"{k} {v}" for k, v in overrides[variant].items())
    if variant == "default":
        return f"{base_model[group]} (default)"
    return str(overrides[variant][group])


def _cell(mean: float, std: float, digits: int = 2) -> str:
    return f"{mean:.{digits}f}" + ("" if pd.isna(std) else f" ± {std:.{digits}f}")


def group_table(
    group: str,
    variants: list[str],
    summary: pd.DataFrame,
    base_model: dict[str, Any],
    overrides: dict[str, dict[str, Any]],
) -> str:
    """Markdown: one row per variant: params, MACs of one forward, FID, FID/floor, accuracy (mean ± std), seeds."""
    lines = [
        "| variant | params | MACs per image | FID | FID / floor | cond. accuracy | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        r = summary.loc[v]
        lines.append(
            f"| {_name(group, v, base_model, overrides)} | {int(r['params']):,} | {r['gmacs'] * 1e3:.2f} M | "
            f"{_cell(r['fid_mean'], r['fid_std'])} | {_cell(r['fid_over_floor_mean'], r['fid_over_floor_std'])} | "
            f"{_cell(r['accuracy_mean'], r['accuracy_std'], 3)} | {int(r['seeds'])} |"
        )
    return "\n".join(lines)


def plot_fid_vs_step(curves: pd.DataFrame, variants: list[str], names: dict[str, str], title: str, path: Path) -> Path:
    """FID against training step, one line per variant (mean over seeds, band: min to max)."""
    with png_figure(path, figsize=(6, 3.8), dpi=120) as (_, ax):
        for v in variants:
            by_step = curves[curves["variant"] == v].groupby("step")["fid"]
            if by_step.ngroups == 0:
                continue
            mean, lo, hi = by_step.mean(), by_step.min(), by_step.max()
            (line,) = ax.plot(mean.index, mean.values, marker="o", ms=3, label=names[v])
            ax.fill_between(mean.index, lo.values, hi.values, color=line.get_color(), alpha=0.15)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("FID (periodic, EMA)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return path


def ablation_page(
    benchmark: str,
    groups: dict[str, list[str]],
    overrides: dict[str, dict[str, Any]],
    results: pd.DataFrame,
    curves: pd.DataFrame,
    base_model: dict[str, Any],
    budget: str,
    reports: Path,
) -> tuple[str, dict[str, Any]]:
    """(the markdown page, its summary as JSON) of a study; writes one FID-vs-step figure per group
    under `reports`/ablations/. `groups` maps each group to its variant labels, the default first."""
    summary = summarize(results)
    findings = paper_findings()
    default = summary.loc["default"]
    seeds = results[results["variant"] == "default"]["fid"]
    lines = [
        f"# The design study: {benchmark}",
        "",
        f"_Generated by the `ablation` stage (`uvit ablation {benchmark}`, `dvc repro studies/dvc.yaml`) from "
        f"runs/{benchmark}/ablation/results.csv; do not edit._",
        "",
        f"Every run: {budget}. Each variant differs from the benchmark's own model in one thing; FID is the "
        "score stage's (the digits classifier's feature space, against the train split; lower is better), "
        "FID / floor divides it by the FID of held-out real images. Cells are the mean ± the sample standard "
        "deviation over training seeds (train.seed: initialisation, data order, noise).",
        "",
        "This is the paper's study at a small scale: the paper compares CIFAR-10 models trained for hundreds of "
        "thousands of steps, this one trains a tiny model on 8×8 digits for the budget above, so it measures which "
        "variant gets good fastest. Where ours disagrees with the paper, it disagrees at this scale and budget.",
        "",
        f"{len(results)} runs, {results['wall_time_s'].sum() / 60:.0f} min of training wall time in all "
        "(the train stages' own figures; sampling and scoring add to it).",
        "",
        f"**The default architecture over {len(seeds)} seeds:** FID {_cell(default['fid_mean'], default['fid_std'])} "
        f"(min {seeds.min():.2f}, max {seeds.max():.2f}). Differences smaller than this spread are not findings.",
        "",
        f"A verdict *agrees* or *disagrees* when the means it compares differ by more than the sum of their "
        f"spreads, and is *{UNCLEAR}* otherwise.",
        "",
        "| group | the paper | ours | verdict |",
        "|---|---|---|---|",
    ]
    sections, verdicts = [], {}
    for group, variants in groups.items():
        finding = findings[group]
        result, ours = verdict(group, variants, summary, finding, base_model, overrides)
        verdicts[group] = result
        lines.append(f"| [{finding['title']}](#{group}) | {finding['finding']} | {ours} | **{result}** |")
        names = {v: _name(group, v, base_model, overrides) for v in variants}
        figure = plot_fid_vs_step(curves, variants, names, finding["title"], reports / "ablations" / f"{group}.png")
        sections += [
            f'<a id="{group}"></a>',
            "",
            f"## {finding['title']} (`{group}`)",
            "",
            f"The paper compares {finding['compares']}. **Paper:** {finding['finding']} **Ours:** {ours}: "
            f"**{result}**.",
            "",
            group_table(group, variants, summary, base_model, overrides),
            "",
            f"![FID against training step, {finding['title']}]({figure.relative_to(reports).as_posix()})",
            "",
        ]
    page = "\n".join([*lines, "", *sections])
    meta = {
        "groups": verdicts,
        "runs": len(results),
        "train_wall_time_s": round(float(results["wall_time_s"].sum()), 1),
        "default": {
            "seeds": int(len(seeds)),
            "fid_mean": float(default["fid_mean"]),
            "fid_std": float(default["fid_std"]),
        },
    }
    return page, meta
