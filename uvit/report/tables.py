"""Result tables and markdown reports built from a run's artifact files.

Every figure comes from a file the pipeline wrote (`runs/B/train/summary.json`,
`runs/B/train/metrics.csv`, `runs/B/sample-summary/summary.json`, `runs/B/sample-summary/grid.png`,
`runs/B/score/metrics.json`, and for text-to-image `runs/B/sample-summary/examples.{png,json}`, the
paper's example captions; with a seed spread, `runs/B/spread/summary.json`) or from the packaged paper table; a missing artifact shows as
"not run" and a missing field as "—", never as a made-up value.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uvit.report.paper import BENCHMARKS, best_uvit_result, has_paper_figures, paper_results
from uvit.report.plots import plot_loss

if TYPE_CHECKING:
    import pandas as pd

DASH = "—"
NOT_RUN = "not run"
OUR_LABEL = "uvit (this project)"
GFLOPS_HEADER = "GFLOPs (G MACs / forward)"

TRAIN_SUMMARY = Path("train/summary.json")
TRAIN_METRICS = Path("train/metrics.csv")
SAMPLE_SUMMARY = Path("sample-summary/summary.json")
SAMPLE_GRID = Path("sample-summary/grid.png")
EXAMPLES_GRID = Path("sample-summary/examples.png")
EXAMPLES = Path("sample-summary/examples.json")
SCORE = Path("score/metrics.json")
SPREAD_SUMMARY = Path("spread/summary.json")  # the spread stage's: figures over training seeds

TEXT_TO_IMAGE = ("mscoco256",)  # benchmarks scored with the CLIP score and shown with the paper's captions

_BLURBS = {
    "digits": "the project's own small CPU benchmark (the paper has no figures for it)",
    "cifar10": "unconditional CIFAR-10 image generation",
    "celeba64": "unconditional CelebA 64×64 image generation",
    "imagenet64": "class-conditional ImageNet 64×64 image generation",
    "imagenet256": "class-conditional ImageNet 256×256 generation in an autoencoder's latent space",
    "imagenet512": "class-conditional ImageNet 512×512 generation in an autoencoder's latent space",
    "mscoco256": "text-to-image generation on MS-COCO 256×256 in an autoencoder's latent space",
}


# --------------------------------------------------------------------------- loading


@dataclass
class RunArtifacts:
    """What one benchmark run left on disk; a field is None when its file is missing."""

    benchmark: str
    train_summary: dict | None = None
    train_metrics: pd.DataFrame | None = None
    sample_summary: dict | None = None
    score: dict | None = None
    grid_path: Path | None = None
    examples_path: Path | None = None  # text-to-image: the paper's example captions' grid
    examples: dict | None = None  # its captions (examples.json)
    spread: dict | None = None  # the seed spread (uvit.report.spread.spread_summary), when it has one
    files: tuple[Path, ...] = ()  # the artifact files actually found, for the report footer

    @property
    def ran(self) -> bool:
        """True when any artifact exists."""
        return bool(self.files)

    @property
    def status(self) -> str:
        """ "done" (scored), "partial" (some stages ran, no score yet) or "not run"."""
        if self.score is not None:
            return "done"
        return "partial" if self.ran else NOT_RUN


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"corrupt JSON artifact {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"corrupt JSON artifact {path}: expected an object, got {type(data).__name__}")
    return data


def _read_metrics(path: Path) -> pd.DataFrame | None:
    import pandas as pd

    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"corrupt CSV artifact {path}: {exc}") from exc
    missing = {"step", "loss"} - set(df.columns)
    if missing:
        raise ValueError(f"corrupt CSV artifact {path}: missing column(s) {sorted(missing)}")
    return df


def load_run(run_dir: str | Path, benchmark: str) -> RunArtifacts:
    """Read whatever artifacts `run_dir` holds. Missing files give None fields (no error);
    a file that exists but cannot be parsed raises ValueError naming it."""
    run_dir = Path(run_dir)
    found = [
        run_dir / rel
        for rel in (
            TRAIN_SUMMARY,
            TRAIN_METRICS,
            SAMPLE_SUMMARY,
            SAMPLE_GRID,
            EXAMPLES_GRID,
            EXAMPLES,
            SCORE,
            SPREAD_SUMMARY,
        )
    ]
    grid, examples = run_dir / SAMPLE_GRID, run_dir / EXAMPLES_GRID
    return RunArtifacts(
        benchmark=benchmark,
        train_summary=_read_json(run_dir / TRAIN_SUMMARY),
        train_metrics=_read_metrics(run_dir / TRAIN_METRICS),
        sample_summary=_read_json(run_dir / SAMPLE_SUMMARY),
        score=_read_json(run_dir / SCORE),
        grid_path=grid if grid.is_file() else None,
        examples_path=examples if examples.is_file() else None,
        examples=_read_json(run_dir / EXAMPLES),
        spread=_read_json(run_dir / SPREAD_SUMMARY),
        files=tuple(p for p in found if p.is_file()),
    )


# --------------------------------------------------------------------------- formatting


def _num(d: dict | None, key: str) -> float | None:
    """A finite number under `key`, else None (missing, null, non-numeric or NaN)."""
    if not d:
        return None
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return v


def _text(d: dict | None, key: str) -> str | None:
    v = d.get(key) if d else None
    return str(v) if v not in (None, "") else None


def _int(v: float | None) -> str:
    return DASH if v is None else f"{int(v):,}"


def _float(v: float | None, digits: int = 2) -> str:
    return DASH if v is None else f"{v:.{digits}f}"


def _general(v: float | None) -> str:
    """Compact float for settings such as the guidance scale (1.0 -> "1", 0.25 -> "0.25")."""
    return DASH if v is None else f"{v:g}"


def _mean_std(spread: dict | None, figure: str, digits: int = 2) -> str | None:
    """ "mean ± std" of a figure of the seed spread, or None when it has no such figure."""
    stats = spread.get(figure) if spread else None
    if not isinstance(stats, dict) or _num(stats, "mean") is None:
        return None
    return f"{_float(_num(stats, 'mean'), digits)} ± {_float(_num(stats, 'std'), digits)}"


def _seeds(spread: dict) -> str:
    return ", ".join(str(s) for s in spread.get("seeds") or [])


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _millions(params: float | None) -> str:
    return DASH if params is None else f"{params / 1e6:.1f}M"


def _preset(art: RunArtifacts) -> str:
    title, preset = _text(art.train_summary, "title"), _text(art.train_summary, "preset")
    if title and preset:
        return f"{title} (`{preset}`)"
    return title or (f"`{preset}`" if preset else DASH)


def _fid_over_floor(score: dict | None) -> float | None:
    """The artifact's `fid_over_floor`, else FID / floor when both are in the artifact."""
    ratio = _num(score, "fid_over_floor")
    if ratio is not None:
        return ratio
    fid, floor = _num(score, "fid"), _num(score, "fid_floor")
    return fid / floor if fid is not None and floor else None


def _display(path: Path) -> str:
    """`path` relative to the working directory when inside it, else as given."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- tables


def results_table(art: RunArtifacts) -> pd.DataFrame:
    """One row describing our run; fields missing from the artifacts show as "—"."""
    import pandas as pd

    t, s, sc = art.train_summary, art.sample_summary, art.score
    row = {
        "preset": _preset(art),
        "params": _int(_num(t, "params")),
        GFLOPS_HEADER: _float(_num(t, "gmacs")),
        "training steps": _int(_num(t, "steps")),
        "images seen": _int(_num(t, "images_seen")),
        "training wall time": _duration(_num(t, "wall_time_s")),
        "sampler": _text(s, "sampler") or DASH,
        "NFE": _int(_num(s, "nfe")),
        "guidance scale": _general(_num(s, "guidance_scale")),
        "FID": _float(_num(sc, "fid")),
        "FID samples": _int(_num(sc, "num_samples")),
        "FID floor (real vs real)": _float(_num(sc, "fid_floor")),
        "FID / floor": _float(_fid_over_floor(sc)),
        "KID (± std over subsets)": _kid(sc),
        "Inception score": _float(_num(sc, "inception_score")),
        "precision / recall": DASH
        if _num(sc, "precision") is None
        else f"{_float(_num(sc, 'precision'), 3)} / {_float(_num(sc, 'recall'), 3)}",
        "conditional accuracy": _float(_num(sc, "conditional_accuracy"), 3),
        "CLIP score": _float(_num(sc, "clip_score"), 3),
        "hardware": _text(t, "hardware") or DASH,
    }
    if art.spread is not None:  # the same figures over training seeds, beside this run's
        over = f" over training seeds {_seeds(art.spread)} (mean ± std)"
        row["FID" + over] = _mean_std(art.spread, "fid") or DASH
        row["FID / floor" + over] = _mean_std(art.spread, "fid_over_floor") or DASH
        row["conditional accuracy" + over] = _mean_std(art.spread, "accuracy", 3) or DASH
    return pd.DataFrame([row])


def spread_table(spread: dict) -> pd.DataFrame:
    """One row per run of the seed spread (the benchmark's own first), then mean ± std and min-max."""
    import pandas as pd

    figures = [
        ("FID", "fid", 2),
        ("FID floor", "fid_floor", 2),
        ("FID / floor", "fid_over_floor", 2),
        ("conditional accuracy", "accuracy", 3),
        ("final training loss", "final_loss", 4),
    ]
    rows = [
        {
            "train.seed": str(r.get("seed")),
            "run": f"`{r.get('run')}`",
            **{h: _float(_num(r, k), d) for h, k, d in figures},
        }
        for r in spread.get("runs") or []
    ]
    rows.append({"train.seed": "mean ± std", "run": "", **{h: _mean_std(spread, k, d) or DASH for h, k, d in figures}})
    rows.append(
        {
            "train.seed": "min – max",
            "run": "",
            **{
                h: f"{_float(_num(spread.get(k), 'min'), d)} – {_float(_num(spread.get(k), 'max'), d)}"
                if isinstance(spread.get(k), dict) and _num(spread[k], "min") is not None
                else DASH
                for h, k, d in figures
            },
        }
    )
    return pd.DataFrame(rows)


def _spread_section(art: RunArtifacts) -> list[str]:
    spread = art.spread
    n = len(spread.get("runs") or [])
    return [
        "## Seed spread",
        "",
        f"The same configuration trained, sampled and scored {n} times, once per training seed ({_seeds(spread)}; "
        f"the sample seed is the same), on {_text(art.train_summary, 'hardware') or DASH}. One run's figure moves "
        "with the seed: compare runs by this spread, not by one number. std is the sample standard deviation "
        f"over the {n} runs. A rerun of one seed on another machine need not repeat its figures either: the "
        "training loss can differ in its last bits from a few tens of steps on (float-level differences "
        "between CPUs), and the FID moves with it.",
        "",
        spread_table(spread).to_markdown(index=False, disable_numparse=True),
        "",
    ]


def _kid(score: dict | None) -> str:
    """KID with its spread over subsets, in the artifact's own units (a KID near 0 within its std
    means the sets are not told apart at this sample count)."""
    k, std = _num(score, "kid"), _num(score, "kid_std")
    if k is None:
        return DASH
    fmt = (lambda v: f"{v:.3g}") if abs(k) >= 1 else (lambda v: f"{v:.2e}")  # noqa: E731
    return fmt(k) + (f" ± {fmt(std)}" if std is not None else "")


def _paper_params(params: Any, extra: Any) -> str:
    has = [isinstance(v, str) and v.strip() != "" for v in (params, extra)]
    if has[0] and has[1]:
        return f"{params} + {extra}"
    return params if has[0] else (f"+ {extra}" if has[1] else DASH)


def _our_notes(art: RunArtifacts) -> str:
    parts = []
    title, steps = _text(art.train_summary, "title"), _num(art.train_summary, "steps")
    if title or steps is not None:
        parts.append(", ".join(p for p in (title, f"{_int(steps)} steps" if steps is not None else None) if p))
    sampler, nfe = _text(art.sample_summary, "sampler"), _num(art.sample_summary, "nfe")
    if sampler or nfe is not None:
        parts.append(", ".join(p for p in (sampler, f"{_int(nfe)} NFE" if nfe is not None else None) if p))
    if art.score is None:
        parts.append("no score artifact yet")
    else:
        n, fx = _num(art.score, "num_samples"), _text(art.score, "feature_extractor")
        parts.append(f"FID on {_int(n)} samples" + (f" ({fx})" if fx else ""))
    return "; ".join(parts)


def comparison_table(art: RunArtifacts) -> pd.DataFrame:
    """The paper's rows for the benchmark plus ours ("uvit (this project)"), sorted by FID
    (unscored rows last). Columns: method, params, FID, notes."""
    import pandas as pd

    paper = paper_results(art.benchmark)
    rows = [
        {
            "method": r.method,
            "params": _paper_params(r.params, r.extra_params),
            "_fid": r.fid,
            "notes": r.notes if isinstance(r.notes, str) else "",
        }
        for r in paper.itertuples(index=False)
    ]
    fid = _num(art.score, "fid")
    rows.append(
        {
            "method": OUR_LABEL,
            "params": _millions(_num(art.train_summary, "params")),
            "_fid": math.nan if fid is None else fid,
            "notes": _our_notes(art),
        }
    )
    df = pd.DataFrame(rows).sort_values("_fid", kind="mergesort", na_position="last")
    df.insert(2, "FID", [NOT_RUN if math.isnan(v) else f"{v:.2f}" for v in df["_fid"]])
    return df.drop(columns="_fid").reset_index(drop=True)


def _field_value(df: pd.DataFrame) -> pd.DataFrame:
    """A one-row table turned into (field, value) rows, which reads better in markdown."""
    import pandas as pd

    return pd.DataFrame({"field": list(df.columns), "value": [str(v) for v in df.iloc[0]]})


# --------------------------------------------------------------------------- markdown


def run_command(benchmark: str) -> str:
    """The command that produces a benchmark's artifacts."""
    return "dvc repro" if benchmark == "digits" else f"dvc repro paper/dvc.yaml:report@{benchmark}"


def _description(art: RunArtifacts) -> str:
    """One paragraph saying what was run, every figure read from the artifacts."""
    t, s, sc = art.train_summary, art.sample_summary, art.score
    out: list[str] = []
    if t is not None:
        title, preset = _text(t, "title"), _text(t, "preset")
        bits = [f"Trained {title or 'U-ViT'} (preset `{preset or DASH}`, {_int(_num(t, 'params'))} parameters,"]
        bits.append(
            f"{_float(_num(t, 'gmacs') * 1000, 1) if _num(t, 'gmacs') is not None else DASH} M MACs per forward)"
        )
        data = t.get("data") if isinstance(t.get("data"), dict) else None
        if data is not None and data.get("rows") is not None:
            classes = data.get("classes") or []
            named = f"; classes: {', '.join(classes)}" if 0 < len(classes) <= 50 else ""
            bits.append(f"on {_int(data['rows'])} training images ({data.get('source') or DASH}{named})")
        bits.append(f"for {_int(_num(t, 'steps'))} steps at batch size {_int(_num(t, 'batch_size'))}")
        bits.append(f"({_int(_num(t, 'images_seen'))} images seen) in {_duration(_num(t, 'wall_time_s'))}")
        bits.append(f"through Ray Train on {_text(t, 'hardware') or DASH} ({_text(t, 'precision') or DASH} precision,")
        bits.append(f"{_float(_num(t, 'steps_per_s'))} steps/s);")
        bits.append(f"final training loss {_float(_num(t, 'final_loss'), 4)}.")
        out.append(" ".join(bits))
    if s is not None:
        out.append(
            f"Sampled {_int(_num(s, 'num_samples'))} images with the {_text(s, 'sampler') or DASH} sampler, "
            f"{_int(_num(s, 'steps'))} steps ({_int(_num(s, 'nfe'))} NFE), guidance scale "
            f"{_general(_num(s, 'guidance_scale'))}, {_text(s, 'weights') or DASH} weights, seed "
            f"{_int(_num(s, 'seed'))}, in {_duration(_num(s, 'wall_time_s'))} "
            f"({_float(_num(s, 'images_per_s'))} images/s)"
            + (
                f", as {_int(_num(s, 'shards_computed') + _num(s, 'shards_reused'))} resumable shards on "
                f"{_int(_num(s, 'num_workers'))} worker(s)"
                if None not in (_num(s, "shards_computed"), _num(s, "shards_reused"), _num(s, "num_workers"))
                else ""
            )
            + "."
        )
    if sc is not None:
        line = (
            f"FID {_float(_num(sc, 'fid'))} measured with {_text(sc, 'feature_extractor') or DASH} "
            f"features on {_int(_num(sc, 'num_samples'))} samples"
        )
        extras = []
        if _num(sc, "fid_floor") is not None:
            extras.append(f"real-vs-real floor {_float(_num(sc, 'fid_floor'))} at the same sample count")
        if _num(sc, "fid_ceiling") is not None:
            extras.append(f"untrained-model ceiling {_float(_num(sc, 'fid_ceiling'))}")
        if _num(sc, "kid") is not None:
            k, std = _num(sc, "kid"), _num(sc, "kid_std")
            within = std is not None and abs(k) <= std
            extras.append(
                f"KID {_kid(sc)} on subsets of {_int(_num(sc, 'kid_subset_size'))}"
                + (", within its spread of 0 (not told apart from real images at this count)" if within else "")
                + (
                    f", real-vs-real {_kid({'kid': _num(sc, 'kid_floor')})}"
                    if _num(sc, "kid_floor") is not None
                    else ""
                )
            )
        if _num(sc, "clip_score") is not None:
            extras.append(f"CLIP score {_float(_num(sc, 'clip_score'), 3)} with {_text(sc, 'clip_model') or DASH}")
        if _num(sc, "classifier_test_accuracy") is not None:
            extras.append(
                f"the classifier behind the conditional accuracy scores "
                f"{_float(_num(sc, 'classifier_test_accuracy'), 3)} on real test images"
            )
        out.append(line + (f" ({'; '.join(extras)})." if extras else "."))
    else:
        out.append(f"Not scored yet (no `{SCORE}`); run `{run_command(art.benchmark)}` to finish it.")
    return " ".join(out)


def _not_run_page(benchmark: str) -> str:
    lines = [
        f"# U-ViT on {benchmark}",
        "",
        f"_Benchmark: {_BLURBS.get(benchmark, benchmark)}._",
        "",
        "**This benchmark has not been run**: none of its artifact files exist yet. Run it with",
        "",
        "```",
        run_command(benchmark),
        "```",
        "",
        "and regenerate the reports.",
        "",
    ]
    return "\n".join(lines)


def _asset(src: Path | None, dest: Path) -> bool:
    """Copy `src` to `dest` (or drop a stale `dest` when there is no source)."""
    if src is None:
        dest.unlink(missing_ok=True)
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return True


def write_benchmark_report(benchmark: str, run_dir: str | Path, reports_dir: str | Path) -> Path:
    """Write `reports_dir/B.md` and its figures under `reports_dir/B/`; return the page path."""
    art = load_run(run_dir, benchmark)
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    page = reports_dir / f"{benchmark}.md"
    assets = reports_dir / benchmark
    if not art.ran:
        for stale in ("samples.png", "loss.png", "examples.png"):
            (assets / stale).unlink(missing_ok=True)
        page.write_text(_not_run_page(benchmark), encoding="utf-8")
        return page

    md = [
        f"# U-ViT on {benchmark}",
        "",
        f"_Benchmark: {_BLURBS.get(benchmark, benchmark)}._",
        "",
        _description(art),
        "",
        "## Results",
        "",
        _field_value(results_table(art)).to_markdown(index=False, disable_numparse=True),
        "",
    ]
    if art.spread is not None:
        md += _spread_section(art)
    if has_paper_figures(benchmark):
        md += [
            "## Comparison with the paper",
            "",
            "FIDs (lower is better) from the U-ViT paper (Bao et al., CVPR 2023, arXiv 2209.12152), "
            'sorted by FID; rows noted "this paper" are U-ViT\'s own. FID is biased upward when '
            "computed on few samples, so read our figure with its sample count in mind.",
            "",
            comparison_table(art).to_markdown(index=False, disable_numparse=True),
            "",
        ]

    md += ["## Samples", ""]
    if _asset(art.grid_path, assets / "samples.png"):
        md.append(f"![sample grid]({benchmark}/samples.png)")
    else:
        md.append(f"_{NOT_RUN}: no `{SAMPLE_GRID}`._")
    if benchmark in TEXT_TO_IMAGE:
        md += ["", "## The paper's example captions", ""]
        if _asset(art.examples_path, assets / "examples.png") and art.examples:
            caps = art.examples.get("captions") or []
            md.append(f"One row per caption ({_int(_num(art.examples, 'per_caption'))} samples each), top to bottom:")
            md.append("")
            md += [f"{i + 1}. {c}" for i, c in enumerate(caps)]
            md += ["", f"![samples for the paper's example captions]({benchmark}/examples.png)"]
        else:
            md.append(f"_{NOT_RUN}: no `{EXAMPLES_GRID}` (the sample stage writes it for text-to-image runs)._")
    else:
        (assets / "examples.png").unlink(missing_ok=True)
    md += ["", "## Training loss", ""]
    loss_png = assets / "loss.png"
    metrics = art.train_metrics
    if metrics is not None and not metrics.dropna(subset=["step", "loss"]).empty:
        plot_loss(metrics, loss_png)
        md.append(f"![training loss]({benchmark}/loss.png)")
    else:
        loss_png.unlink(missing_ok=True)
        md.append(f"_{NOT_RUN}: no `{TRAIN_METRICS}` rows._")

    sources = ", ".join(f"`{_display(p)}`" for p in art.files)
    md += [
        "",
        "---",
        "",
        f"Generated by `uvit.report` from {sources}"
        + (" and the packaged paper table `uvit/report/data/paper_results.csv`" if benchmark != "digits" else "")
        + '. Every figure is read from these files; nothing is filled by hand ("—" marks a field '
        "the artifacts do not have).",
        "",
    ]
    page.write_text("\n".join(md), encoding="utf-8")
    return page


def _paper_uvit_cell(benchmark: str) -> str:
    if not has_paper_figures(benchmark):
        return DASH
    best = best_uvit_result(benchmark)
    return DASH if best is None else f"{best['fid']:.2f} ({best['method']})"


def _index_fid(art: RunArtifacts) -> str:
    """The run's FID, and with a seed spread its mean ± std over the seeds."""
    if art.score is None:
        return NOT_RUN
    fid, spread = _float(_num(art.score, "fid")), _mean_std(art.spread, "fid")
    return f"{fid} ({spread} over {len(art.spread.get('runs') or [])} seeds)" if spread else fid


def index_table(
    run_root: str | Path, benchmarks: tuple[str, ...] = BENCHMARKS, reports_dir: str | Path | None = None
) -> pd.DataFrame:
    """The summary table of `write_index`: one row per benchmark, linking pages that exist
    (every page when `reports_dir` is None)."""
    import pandas as pd

    rows = []
    for b in benchmarks:
        art = load_run(Path(run_root) / b, b)
        t, s = art.train_summary, art.sample_summary
        sampler, nfe = _text(s, "sampler"), _num(s, "nfe")
        rows.append(
            {
                "benchmark": b,
                "preset": _preset(art),
                "params": _int(_num(t, "params")),
                "steps": _int(_num(t, "steps")),
                "sampler / NFE": DASH if s is None else f"{sampler or DASH} / {_int(nfe)}",
                "guidance": _general(_num(s, "guidance_scale")),
                "FID (ours)": _index_fid(art),
                "FID (paper's U-ViT)": _paper_uvit_cell(b),
                "CLIP score (ours)": (_float(_num(art.score, "clip_score"), 3) if art.score is not None else NOT_RUN)
                if b in TEXT_TO_IMAGE
                else DASH,
                "status": art.status,
                "report": f"[{b}]({b}.md)"
                if reports_dir is None or (Path(reports_dir) / f"{b}.md").is_file()
                else f"`{run_command(b)}`",
            }
        )
    return pd.DataFrame(rows)


def write_index(run_root: str | Path, reports_dir: str | Path, benchmarks: tuple[str, ...] = BENCHMARKS) -> Path:
    """Write `reports_dir/README.md`: one summary row per benchmark, linking its page."""
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    md = [
        "# uvit results",
        "",
        "U-ViT (Bao et al., CVPR 2023, arXiv 2209.12152) reproduced benchmark by benchmark. "
        "Our FIDs are read from each run's `score/metrics.json`; the paper's U-ViT FID is its best "
        '"this paper" row for the benchmark. `partial` means some stages ran but there is no score yet.',
        "",
        index_table(run_root, benchmarks, reports_dir).to_markdown(index=False, disable_numparse=True),
        "",
        "Each figure is one training run (one `train.seed`) sampled once (one `sample.seed`); a figure moves "
        "with the seeds, so compare runs by their spread over seeds, not by one number. Where a benchmark has "
        "a seed spread (its `spread` block: digits), its mean ± standard deviation over training seeds follows "
        "in brackets and its page lists the runs. The design study ([ablations.md](ablations.md), `make study`) "
        "retrains the digits model with several seeds at a shorter budget and gives that spread beside each "
        "of its variants.",
        "",
        f"Generated by `uvit.report` from the artifacts under `{_display(Path(run_root))}` and "
        "`uvit/report/data/paper_results.csv`; nothing is filled by hand.",
        "",
    ]
    path = reports_dir / "README.md"
    path.write_text("\n".join(md), encoding="utf-8")
    return path


def write_reports(
    run_root: str | Path, reports_dir: str | Path, benchmarks: tuple[str, ...] = BENCHMARKS
) -> list[Path]:
    """Write every benchmark page and the index; return the pages written (index last)."""
    pages = [write_benchmark_report(b, Path(run_root) / b, reports_dir) for b in benchmarks]
    return pages + [write_index(run_root, reports_dir, benchmarks)]
