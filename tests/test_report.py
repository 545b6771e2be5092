"""Tests for uvit.report: fake run directories with the pipeline's artifact schemas."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from uvit.report import (
    BENCHMARKS,
    PAPER_CAPTIONS,
    comparison_table,
    load_run,
    paper_results,
    plot_loss,
    results_table,
    write_benchmark_report,
    write_index,
)
from uvit.report.tables import GFLOPS_HEADER, OUR_LABEL

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OUR_FID = 12.34


def _png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1), dpi=16)
    fig.savefig(path, format="png")
    plt.close(fig)


def make_run(
    root: Path,
    benchmark: str,
    *,
    score: dict | None = None,
    train: bool = True,
    samples: bool = True,
) -> Path:
    """A fake `runs/<benchmark>` with the schemas the pipeline stages write."""
    run = root / benchmark
    if train:
        (run / "train").mkdir(parents=True)
        summary = {
            "benchmark": benchmark,
            "preset": f"{benchmark}_small",
            "title": "U-ViT-S/2",
            "params": 44_312_345,
            "gmacs": 11.34,
            "steps": 1500,
            "batch_size": 128,
            "images_seen": 192_000,
            "wall_time_s": 5400.0,
            "steps_per_s": 0.28,
            "final_loss": 0.0312,
            "num_workers": 2,
            "precision": "bf16",
            "hardware": "1x FakeGPU",
        }
        (run / "train/summary.json").write_text(json.dumps(summary))
        lines = ["step,loss,lr,grad_norm,images_per_s,elapsed_s"]
        lines += [
            f"{s},{1.0 / (1 + s):.6f},{1e-4 * min(1, s / 10):.2e},1.0,100.0,{s * 0.1:.1f}" for s in range(0, 200, 2)
        ]
        (run / "train/metrics.csv").write_text("\n".join(lines) + "\n")
    if samples:
        (run / "sample-summary").mkdir(parents=True)
        (run / "sample-summary/summary.json").write_text(
            json.dumps(
                {
                    "sampler": "dpm_solver",
                    "steps": 25,
                    "nfe": 50,
                    "guidance_scale": 0.0,
                    "num_samples": 1000,
                    "wall_time_s": 30.0,
                    "images_per_s": 33.3,
                    "seed": 7,
                    "weights": "ema",
                }
            )
        )
        _png(run / "sample-summary/grid.png")
    if score is not None:
        (run / "score").mkdir(parents=True)
        (run / "score/metrics.json").write_text(json.dumps(score))
    return run


def _is_png(path: Path) -> bool:
    from PIL import Image

    if not path.is_file() or path.read_bytes()[:8] != PNG_MAGIC:
        return False
    with Image.open(path) as im:
        im.verify()
    return True


# --------------------------------------------------------------------------- paper


def test_paper_results_imagenet256_has_uvit_h2() -> None:
    df = paper_results("imagenet256")
    assert set(df["benchmark"]) == {"imagenet256"}
    row = df[df["method"] == "U-ViT-H/2"]
    assert len(row) == 1
    assert row["fid"].iloc[0] == pytest.approx(2.29)
    assert row["params"].iloc[0] == "501M"
    assert row["notes"].iloc[0] == "this paper"


def test_paper_results_digits_empty_and_unknown_raises() -> None:
    assert paper_results("digits").empty
    assert len(paper_results()) > len(paper_results("cifar10")) > 0
    with pytest.raises(ValueError, match="cifar100"):
        paper_results("cifar100")


def test_paper_captions_and_source() -> None:
    from importlib import resources

    assert len(PAPER_CAPTIONS) == 8
    assert len(set(PAPER_CAPTIONS)) == 8
    assert PAPER_CAPTIONS[0] == "a baseball player swinging a bat at a ball"
    source = resources.files("uvit.report").joinpath("data", "SOURCE.md").read_text(encoding="utf-8")
    assert "2209.12152" in source
    for caption in PAPER_CAPTIONS:
        assert caption in source


def test_packaged_csv_is_verbatim_copy() -> None:
    from importlib import resources

    shared = Path(__file__).resolve().parents[2] / "shared/paper/results.csv"
    if not shared.is_file():
        pytest.skip("shared/paper/results.csv not present")
    packaged = resources.files("uvit.report").joinpath("data", "paper_results.csv").read_bytes()
    assert packaged == shared.read_bytes()


def test_benchmarks_match_config() -> None:
    try:
        from uvit.config import BENCHMARKS as CONFIG_BENCHMARKS
    except ImportError as exc:  # pragma: no cover - config deps missing
        pytest.skip(f"uvit.config not importable: {exc}")
    assert BENCHMARKS == CONFIG_BENCHMARKS


# --------------------------------------------------------------------------- tables


def test_results_table_formats_and_dashes(tmp_path: Path) -> None:
    make_run(tmp_path, "cifar10", score={"fid": OUR_FID, "feature_extractor": "inception-v3", "num_samples": 1000})
    row = results_table(load_run(tmp_path / "cifar10", "cifar10")).iloc[0]
    assert row["params"] == "44,312,345"
    assert "MACs" in GFLOPS_HEADER and row[GFLOPS_HEADER] == "11.34"
    assert row["training steps"] == "1,500"
    assert row["images seen"] == "192,000"
    assert row["training wall time"] == "90.0 min"
    assert row["NFE"] == "50"
    assert row["FID"] == "12.34"
    assert row["FID floor (real vs real)"] == "—"
    assert row["FID / floor"] == "—"
    assert row["CLIP score"] == "—"
    assert row["conditional accuracy"] == "—"
    assert row["hardware"] == "1x FakeGPU"


def test_comparison_sorted_with_our_row(tmp_path: Path) -> None:
    make_run(tmp_path, "cifar10", score={"fid": OUR_FID, "feature_extractor": "inception-v3", "num_samples": 1000})
    df = comparison_table(load_run(tmp_path / "cifar10", "cifar10"))
    assert list(df.columns) == ["method", "params", "FID", "notes"]
    fids = [float(v) for v in df["FID"]]
    assert fids == sorted(fids)
    assert len(df) == len(paper_results("cifar10")) + 1
    ours = df.index[df["method"] == OUR_LABEL]
    assert len(ours) == 1
    assert df.loc[ours[0], "FID"] == "12.34"
    assert df.loc[ours[0], "params"] == "44.3M"
    # between DDPM (3.17) and GenViT (20.20)
    methods = list(df["method"])
    assert methods.index("DDPM") < methods.index(OUR_LABEL) < methods.index("GenViT")
    assert df.loc[df["method"] == "U-ViT-S/2", "FID"].item() == "3.11"


def test_missing_score_says_not_run(tmp_path: Path) -> None:
    make_run(tmp_path, "cifar10", score=None)
    art = load_run(tmp_path / "cifar10", "cifar10")
    assert art.score is None and art.train_summary is not None
    df = comparison_table(art)
    ours = df[df["method"] == OUR_LABEL].iloc[0]
    assert ours["FID"] == "not run"
    assert not re.search(r"\d", ours["FID"])
    assert df["method"].iloc[-1] == OUR_LABEL  # unscored row sorts last
    assert results_table(art).iloc[0]["FID"] == "—"
    page = write_benchmark_report("cifar10", tmp_path / "cifar10", tmp_path / "reports").read_text()
    assert f"| {OUR_LABEL} " in page and "not run" in page
    assert "12.34" not in page


def test_load_run_missing_everything(tmp_path: Path) -> None:
    art = load_run(tmp_path / "nope", "cifar10")
    assert art.train_summary is art.train_metrics is art.sample_summary is art.score is art.grid_path is None
    assert art.status == "not run"
    df = comparison_table(art)
    assert df[df["method"] == OUR_LABEL]["FID"].item() == "not run"


@pytest.mark.parametrize("rel", ["train/summary.json", "score/metrics.json"])
def test_corrupt_json_names_file(tmp_path: Path, rel: str) -> None:
    run = make_run(tmp_path, "cifar10", score={"fid": 1.0})
    (run / rel).write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(run / rel))):
        load_run(run, "cifar10")
    with pytest.raises(ValueError, match="corrupt"):
        write_benchmark_report("cifar10", run, tmp_path / "reports")


# --------------------------------------------------------------------------- reports


def test_cifar10_report(tmp_path: Path) -> None:
    make_run(tmp_path, "cifar10", score={"fid": OUR_FID, "feature_extractor": "inception-v3", "num_samples": 1000})
    reports = tmp_path / "reports"
    page = write_benchmark_report("cifar10", tmp_path / "cifar10", reports)
    assert page == reports / "cifar10.md"
    text = page.read_text()
    assert "12.34" in text
    assert "U-ViT-S/2" in text and "3.11" in text
    assert "| 20.20 " in text and "| 2.90 " in text  # paper figures keep their printed digits
    assert "Trained U-ViT-S/2 (preset `cifar10_small`, 44,312,345 parameters" in text
    assert "Comparison with the paper" in text
    assert "44,312,345" in text
    assert "dpm_solver" in text
    assert "nothing is filled by hand" in text
    assert "](cifar10/samples.png)" in text and "](cifar10/loss.png)" in text
    assert _is_png(reports / "cifar10/samples.png")
    assert _is_png(reports / "cifar10/loss.png")
    assert "train/summary.json" in text and "score/metrics.json" in text


def test_digits_report_has_floor_and_ratio(tmp_path: Path) -> None:
    make_run(
        tmp_path,
        "digits",
        score={
            "fid": 9.0,
            "feature_extractor": "digits-cnn",
            "num_samples": 500,
            "fid_floor": 2.5,
            "fid_ceiling": 250.0,
            "conditional_accuracy": 0.875,
            "classifier_test_accuracy": 0.981,
        },
    )
    art = load_run(tmp_path / "digits", "digits")
    row = results_table(art).iloc[0]
    assert row["FID floor (real vs real)"] == "2.50"
    assert row["FID / floor"] == "3.60"  # derived from the artifact's fid and floor
    assert row["conditional accuracy"] == "0.875"
    text = write_benchmark_report("digits", tmp_path / "digits", tmp_path / "reports").read_text()
    assert "2.50" in text and "3.60" in text and "250.00" in text
    assert "Comparison with the paper" not in text


def test_ratio_prefers_artifact_value(tmp_path: Path) -> None:
    make_run(tmp_path, "digits", score={"fid": 9.0, "fid_floor": 2.5, "fid_over_floor": 3.75})
    assert results_table(load_run(tmp_path / "digits", "digits")).iloc[0]["FID / floor"] == "3.75"


@pytest.mark.parametrize(
    ("bench", "cmd"), [("digits", "dvc repro"), ("imagenet64", "dvc repro paper/dvc.yaml:report@imagenet64")]
)
def test_not_run_page(tmp_path: Path, bench: str, cmd: str) -> None:
    text = write_benchmark_report(bench, tmp_path / bench, tmp_path / "reports").read_text()
    assert "has not been run" in text
    assert cmd in text
    assert not (tmp_path / "reports" / bench / "loss.png").exists()


def test_index(tmp_path: Path) -> None:
    make_run(tmp_path, "cifar10", score={"fid": OUR_FID})
    make_run(tmp_path, "digits", score={"fid": 9.0, "fid_floor": 2.5})
    make_run(tmp_path, "celeba64", score=None)
    text = write_index(tmp_path, tmp_path / "reports").read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert set(BENCHMARKS) <= set(rows) and len(BENCHMARKS) == 7
    assert "| done " in rows["cifar10"] and "12.34" in rows["cifar10"] and "3.11 (U-ViT-S/2)" in rows["cifar10"]
    assert "| done " in rows["digits"]
    assert "| partial " in rows["celeba64"]
    for b in ("imagenet64", "imagenet256", "imagenet512", "mscoco256"):
        assert "| not run " in rows[b] and "| done " not in rows[b]
        # No page exists for them: the index gives the command that makes one, not a dead link.
        assert f"({b}.md)" not in rows[b] and f"`dvc repro paper/dvc.yaml:report@{b}`" in rows[b]
    write_benchmark_report("imagenet64", tmp_path / "imagenet64", tmp_path / "reports")
    text = write_index(tmp_path, tmp_path / "reports").read_text()
    assert "[imagenet64](imagenet64.md)" in text
    assert "2.29 (U-ViT-H/2)" in rows["imagenet256"]  # best of the 'this paper' rows
    assert "4.26 (U-ViT-L/4)" in rows["imagenet64"]
    assert "one training run (one `train.seed`)" in text and "[ablations.md](ablations.md)" in text


def test_plot_loss_valid_png(tmp_path: Path) -> None:
    import pandas as pd

    df = pd.DataFrame({"step": range(100), "loss": [1.0 / (1 + s) for s in range(100)], "lr": [1e-4] * 100})
    out = plot_loss(df, tmp_path / "sub" / "loss.png")
    assert _is_png(out)
    with pytest.raises(ValueError, match="loss"):
        plot_loss(df.drop(columns="loss"), tmp_path / "bad.png")


def test_text_to_image_page_clip_score_kid_and_example_captions(tmp_path: Path) -> None:
    run = make_run(
        tmp_path / "runs",
        "mscoco256",
        score={
            "fid": 9.87,
            "clip_score": 26.123,
            "clip_model": "openai/clip-vit-large-patch14",
            "kid": 0.0123,
            "kid_std": 0.0007,
            "kid_subset_size": 1000,
            "inception_score": 21.5,
            "feature_extractor": "inception",
            "num_samples": 30000,
        },
    )
    row = results_table(load_run(run, "mscoco256")).iloc[0]
    assert row["CLIP score"] == "26.123" and row["KID (± std over subsets)"] == "1.23e-02 ± 7.00e-04"
    assert row["Inception score"] == "21.50" and row["precision / recall"] == "—"
    reports = tmp_path / "reports"
    # No examples yet: the section says so.
    text = write_benchmark_report("mscoco256", run, reports).read_text()
    assert "## The paper's example captions" in text and "not run: no `sample-summary/examples.png`" in text
    _png(run / "sample-summary/examples.png")
    (run / "sample-summary/examples.json").write_text(json.dumps({"captions": list(PAPER_CAPTIONS), "per_caption": 4}))
    text = write_benchmark_report("mscoco256", run, reports).read_text()
    assert "(mscoco256/examples.png)" in text and _is_png(reports / "mscoco256/examples.png")
    for i, caption in enumerate(PAPER_CAPTIONS):
        assert f"{i + 1}. {caption}" in text
    assert "CLIP score 26.123 with openai/clip-vit-large-patch14" in text
    # Not a text-to-image benchmark: no caption section; the index has a CLIP column for mscoco256 only.
    digits = make_run(
        tmp_path / "runs",
        "digits",
        score={"fid": 8.08, "kid": -75.4, "kid_std": 211.3, "kid_floor": -320.5, "kid_subset_size": 360},
    )
    text = write_benchmark_report("digits", digits, reports).read_text()
    assert "example captions" not in text and "KID -75.4 ± 211 on subsets of 360, within its spread of 0" in text
    assert "real-vs-real -320" in text
    index = (write_index(tmp_path / "runs", reports)).read_text()
    coco = next(line for line in index.splitlines() if line.startswith("| mscoco256"))
    assert "CLIP score (ours)" in index and "26.123" in coco
    cifar = next(line for line in index.splitlines() if line.startswith("| cifar10"))
    assert "not run" in cifar and "26.123" not in cifar
