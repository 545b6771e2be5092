"""Stage `validate`: great-expectations suites over every split; stops the pipeline on failure."""

from __future__ import annotations

from uvit.config import BenchmarkConfig
from uvit.fileio import write_json
from uvit.paths import BenchmarkPaths


def run_validate(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> dict:
    from uvit.data.validate import ImageSplitExpectations, ValidationFailed, validate_image_split

    v = cfg.validate_
    reports, failed = {}, []
    for split in ("train", "test"):
        root = paths.data / split
        if not root.exists():
            continue
        expectations = ImageSplitExpectations(
            num_classes=cfg.data.num_classes,
            min_rows=v.min_rows if split == "train" else 1,
            min_class_share=v.min_class_share,
            max_class_share=v.max_class_share,
        )
        report = validate_image_split(root, expectations)
        reports[split] = report.to_dict()
        print(f"[{split}]\n{report.summary()}")
        if not report.success:
            failed.append((split, report))
    if not reports:
        raise FileNotFoundError(f"no splits under {paths.data}: run the data stage first (`uvit data {cfg.name}`)")
    write_json(paths.validate / "report.json", reports, default=str)
    if failed:
        split, report = failed[0]
        print(f"validation of {paths.data / split} failed; the pipeline stops here")
        raise ValidationFailed(report)
    return {split: r["success"] for split, r in reports.items()}
