"""Where each benchmark's artifacts live (the one place that knows the layout).

    data/<benchmark>/{train,test}/      shards + manifest (data stage)
    data/<benchmark>-latents/, -contexts/  VAE moments, CLIP features (encode stage; latent benchmarks)
    runs/<benchmark>/validate/          great-expectations report
    runs/<benchmark>/train/             final weights (model/, ema/), metrics.csv, summary.json
    runs/<benchmark>/ray/               Ray Train storage: checkpoints of every run
    runs/<benchmark>/samples/           samples.npz (uint8 NHWC + labels), png/, shards/ (DVC cache)
    runs/<benchmark>/sample-summary/    summary.json, grid.png (+ examples.png/json): small, committed
    runs/<benchmark>/classifier/        the digits feature extractor (digits only)
    runs/<benchmark>/score/             metrics.json
    runs/<benchmark>/samplers/          the sampler study: results.csv (per setting and seed), summary.json
    runs/<benchmark>/ablation/<run>/    a design-study run: train/, samples/, sample-summary/, score/ (its
                                        benchmark's data, validate/ and classifier/ are shared)
    runs/<benchmark>/ablation/          results.csv (one row per run), summary.json (the study stage)
    runs/<benchmark>/spread/s<seed>/    a seed-spread run: the benchmark with another train.seed (as above)
    runs/<benchmark>/spread/            summary.json: every run's figures, mean and std (the spread stage)
    reports/<benchmark>.md, reports/<benchmark>/*.png, reports/README.md, reports/samplers.md (+ samplers/),
    reports/ablations.md (+ ablations/)

A study run is named <benchmark>/ablation/<run id> (a seed-spread run <benchmark>/spread/s<seed>):
its run folder nests under its benchmark's, and it reads its benchmark's data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def workspace_root(root: Path) -> Path:
    """`root`, or the workspace a DVC temporary experiment copy under .dvc/tmp/exps/ came from."""
    resolved = Path(root).resolve()
    parts = resolved.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return Path(root)


class _RunFolder:
    """A BenchmarkPaths attribute: runs/<benchmark>/<name>, or with `shared` runs/<base>/<name>
    (a study run uses its base benchmark's)."""

    def __init__(self, name: str, shared: bool = False, doc: str | None = None):
        self.name, self.shared, self.__doc__ = name, shared, doc

    def __get__(self, paths: BenchmarkPaths | None, owner: type | None = None) -> Path:
        if paths is None:
            return self  # type: ignore[return-value]  # the class attribute itself, for help()
        return paths.root / "runs" / (paths.base if self.shared else paths.benchmark) / self.name


@dataclass(frozen=True)
class BenchmarkPaths:
    benchmark: str
    root: Path = Path(".")

    @property
    def base(self) -> str:
        """The benchmark whose data (and validation, classifier) this one uses: itself, or a study run's."""
        return self.benchmark.split("/")[0]

    @property
    def data(self) -> Path:
        return self.root / "data" / self.base

    @property
    def latents(self) -> Path:
        """VAE moments of the image splits (latent benchmarks; the encode stage)."""
        return self.root / "data" / f"{self.base}-latents"

    @property
    def contexts(self) -> Path:
        """CLIP text features of the captions (text-to-image benchmarks; the encode stage)."""
        return self.root / "data" / f"{self.base}-contexts"

    @property
    def run(self) -> Path:
        return self.root / "runs" / self.benchmark

    validate = _RunFolder("validate", shared=True)
    train = _RunFolder("train")
    samples = _RunFolder("samples")
    sample_summary = _RunFolder(
        "sample-summary",
        doc="The sample stage's small, human-facing files (summary, grids): kept in git, unlike samples/.",
    )
    classifier = _RunFolder("classifier", shared=True)
    score = _RunFolder("score")
    samplers = _RunFolder(
        "samplers", doc="The sampler study's results (the samplers stage); its page is reports/samplers.md."
    )
    ablation = _RunFolder(
        "ablation",
        shared=True,
        doc="The design study's results (the ablation stage); its page is reports/ablations.md.",
    )
    spread = _RunFolder(
        "spread",
        shared=True,
        doc="The seed spread's runs (s<seed>/) and summary.json (the spread stage), shown on the benchmark's page.",
    )

    @property
    def ray_storage(self) -> Path:
        """Ray Train's checkpoints of every run (git-ignored, not a DVC output). Inside a DVC
        temporary experiment (`dvc exp run --temp` / `--queue` run in <workspace>/.dvc/tmp/exps/),
        the workspace's folder, so an experiment continues the workspace's training runs."""
        return workspace_root(self.root) / "runs" / self.benchmark / "ray"

    def study_run(self, run: str) -> BenchmarkPaths:
        """The paths of one of this benchmark's study runs (an ablation run id or a full run name)."""
        return BenchmarkPaths(run if "/" in run else f"{self.base}/ablation/{run}", self.root)

    @property
    def reports(self) -> Path:
        return self.root / "reports"
