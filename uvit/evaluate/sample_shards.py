"""Sharded, resumable sampling for scoring: 50k samples as independent, verifiable shards.

    out_dir/
      samples-00000.npz   samples [0, S)    uint8 NHWC `arr_0` + `labels` (save_samples' layout), and
                                            for text-to-image `caption_rows` + `captions`
      samples-00001.npz   samples [S, 2S)
      ...
      shards.json         run parameters + per shard {file, start, count, sha256}
      samples.npz         all shards merged (merge_shards), what FID scoring reads

Sample i always uses seed `sample_seeds(seed, ...)[i]` and label i % K (or caption row
`captions.rows[i]`, :class:`~uvit.evaluate.captions.CaptionSet`), and `generate` makes each
sample depend only on its seed and label, so a shard's content does not depend on the shard
size, the batch size, the number of workers or which run computed it. That is what makes resume
safe: a shard counts as done when the manifest lists it with the sha256 of the file on disk (and
the run parameters, model weights included, are unchanged); anything else is recomputed.
Files and the manifest are written to a temporary name and renamed, so a crash never leaves a
half-written file under a final name; the manifest is updated (by the driver only) as each shard
completes.

Latent models' samples are decoded with the VAE (`decoder`) inside the shard, in batches of 50
as the official scripts do, so a shard holds images. With `png_dir`, every sample is also written
as `png_dir/{i:06d}.png` before its shard counts as done (a reused shard's missing PNGs are
rewritten from the shard file).

`num_workers > 1` runs one Ray task per shard (`num_cpus=1`, or `num_gpus=1` with use_gpu), each
loading the model from `model_dir`; the driver keeps the manifest and a tqdm bar with images/s.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from uvit.evaluate.captions import CaptionSet
from uvit.encoders.vae import LatentDecoder
from uvit.evaluate.sample import (
    Condition,
    SamplingRecipe,
    balanced_labels,
    generate,
    load_sample_extras,
    load_samples,
    png_name,
    sample_seeds,
    save_pngs,
    save_samples,
    to_uint8,
)
from uvit.fileio import read_tree, remove_temps, sha256_dir, sha256_file, sha256_listing, write_json, write_tree
from uvit.models import UViT
from uvit.models.uvit import CONFIG_NAME, WEIGHTS_NAME
from uvit.sharded_work import Piece, Progress, RemoteTask, ShardedWork, Workers, plan_pieces, run_sharded

__all__ = [
    "MANIFEST_NAME",
    "MERGED_NAME",
    "SampleSpec",
    "SamplingRun",
    "ShardIntegrityError",
    "shard_name",
    "shard_ranges",
    "sample_to_shards",
    "merge_shards",
    "read_manifest",
    "verify_shards",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "shards.json"  # not manifest.json: that names a data split's and a published run's files
MERGED_NAME = "samples.npz"
FORMAT = "uvit-sample-shards/1"


class ShardIntegrityError(RuntimeError):
    """A shard is missing, incomplete or does not match its manifest sha256."""


def shard_name(k: int) -> str:
    return f"samples-{k:05d}.npz"


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """[(start, count)] of every shard: shard k holds samples [k*shard_size, (k+1)*shard_size)."""
    if num_samples < 1 or shard_size < 1:
        raise ValueError(f"num_samples and shard_size must be >= 1, got {num_samples}, {shard_size}")
    return [(p.start, p.count) for p in plan_pieces(num_samples, shard_size)]


def read_manifest(out_dir: str | Path) -> dict | None:
    p = Path(out_dir) / MANIFEST_NAME
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON: ignoring it (every shard will be recomputed)", p)
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def _model_fingerprint(model_dir: Path) -> str:
    """sha256 over the model's config and weights: shards of another model are never reused."""
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name} not found: model_dir must be written by UViT.save_pretrained")
    return sha256_listing(model_dir, [CONFIG_NAME, WEIGHTS_NAME])


def _source_fingerprint(source: str) -> str:
    """sha256 of a VAE file or directory (its files in name order); a hub id stands for itself."""
    p = Path(source).expanduser()
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        return sha256_dir(p)
    return source


# ---------------------------------------------------------------------------- what, how
@dataclass(frozen=True)
class SampleSpec:
    """What to sample: the run parameters (the manifest's `run`). Existing shards are reused only when all of them
    and the model's weights match. The batch size and the workers do not change the samples: see SamplingRun.

    num_classes_for_labels: K real classes (labels i % K, independent of sharding) for a class-conditional
        model; None for unconditional ones.
    captions: for a text-to-image model, the caption rows of samples 0..N-1 (guidance uses the split's empty
        context); their fingerprint is part of the run parameters.
    decoder: for a latent model, the VAE that decodes its samples: shards hold decoded images. The VAE's bytes
        and the scale factor are part of the run parameters.
    """

    schedule: str
    sampler: str
    steps: int
    num_samples: int
    shard_size: int
    seed: int
    guidance_scale: float
    num_classes_for_labels: int | None
    sampler_kwargs: dict = field(default_factory=dict)
    captions: CaptionSet | None = None
    decoder: LatentDecoder | None = None

    def __post_init__(self) -> None:
        if self.num_classes_for_labels is not None and self.num_classes_for_labels < 1:
            raise ValueError(f"num_classes_for_labels must be >= 1 or None, got {self.num_classes_for_labels}")
        shard_ranges(self.num_samples, self.shard_size)  # checks both are >= 1


@dataclass(frozen=True)
class SamplingRun:
    """How to sample: batch_size samples per forward pass; num_workers 1 samples in this process on `device`,
    > 1 runs one Ray task per shard (:class:`uvit.sharded_work.Workers`: one CPU thread each, or "cuda" with one
    GPU per task when use_gpu; then `device` is not used)."""

    batch_size: int
    num_workers: int = 1
    use_gpu: bool = False
    device: str = "cpu"
    progress: bool = True


@dataclass(frozen=True)
class _ShardJob:
    """What every shard's worker needs besides the model: the run parameters in their manifest (JSON) form."""

    out_dir: Path
    run: dict
    batch_size: int
    captions: CaptionSet | None
    decoder: LatentDecoder | None
    png_dir: Path | None


# ---------------------------------------------------------------------------- one shard
def _sample_shard(model: UViT, job: _ShardJob, piece: Piece, device: str) -> dict:
    """Generate samples [start, start + count) (decoded to images for latent models), write their
    PNGs, then the shard atomically; returns its manifest entry."""
    run, batch_size, captions, decoder = job.run, job.batch_size, job.captions, job.decoder
    start, count = piece.start, piece.count
    seeds = sample_seeds(run["seed"], count, start=start)
    K = run["num_classes_for_labels"]
    labels = balanced_labels(start + count, K)[start:] if K else None
    text = {}
    if captions is not None:
        text = {
            "contexts": captions.contexts(start, count),
            "empty_context": captions.empty_context() if run["guidance_scale"] > 0 else None,
        }
    recipe = SamplingRecipe(run["schedule"], run["sampler"], run["steps"], run["guidance_scale"], run["sampler_kwargs"])
    x = generate(model, recipe, seeds, Condition(labels, **text), batch_size=batch_size, device=device, progress=False)
    if decoder is not None:
        x = decoder.images(x, device)
    images = to_uint8(x)
    if job.png_dir is not None:
        save_pngs(images, job.png_dir, start)
    extras = captions.metadata(start, count) if captions is not None else None
    path = save_samples(
        job.out_dir / shard_name(piece.index), images, None if labels is None else labels.numpy(), extras
    )
    return {"file": path.name, "start": start, "count": count, "sha256": sha256_file(path)}


_WORKER_MODEL: dict[tuple[str, str], UViT] = {}


def _worker_model(model_files: dict[str, bytes], model_sha256: str, device: str) -> UViT:
    """The model of `model_files`, built once per worker process (a worker samples several shards)."""
    key = (model_sha256, device)
    if key not in _WORKER_MODEL:
        _WORKER_MODEL.clear()
        with tempfile.TemporaryDirectory(prefix="uvit-model-") as tmp:
            write_tree(tmp, model_files)
            _WORKER_MODEL[key] = UViT.from_pretrained(tmp, device=device)
    return _WORKER_MODEL[key]


def _sample_shard_remote(
    model_files: dict[str, bytes], job: _ShardJob, piece: Piece, device: str
) -> tuple[dict, dict[str, bytes], dict[str, bytes]]:
    """A Ray task, on any machine: rebuild the model from its files, sample one shard into a temporary
    directory there, and ship back its manifest entry, shard file and PNGs (`_receive_shard` writes them)."""
    model = _worker_model(model_files, job.run["model_sha256"], device)
    with tempfile.TemporaryDirectory(prefix="uvit-shard-") as tmp:
        here = replace(job, out_dir=Path(tmp) / "out", png_dir=None if job.png_dir is None else Path(tmp) / "png")
        here.out_dir.mkdir()
        entry = _sample_shard(model, here, piece, device)
        return entry, read_tree(here.out_dir), read_tree(here.png_dir) if here.png_dir is not None else {}


def _receive_shard(job: _ShardJob, piece: Piece, shipped: tuple[dict, dict[str, bytes], dict[str, bytes]]) -> dict:
    """On the driver: write a Ray task's PNGs and shard file (the shard last); its manifest entry."""
    entry, shard_files, pngs = shipped
    if job.png_dir is not None:
        write_tree(job.png_dir, pngs)
    write_tree(job.out_dir, shard_files)
    return entry


def _ensure_pngs(out_dir: Path, png_dir: Path, piece: Piece) -> None:
    """Rewrite the PNGs of a reused shard that are missing (e.g. deleted by hand)."""
    if all((png_dir / png_name(i)).is_file() for i in range(piece.start, piece.start + piece.count)):
        return
    images, _ = load_samples(out_dir / shard_name(piece.index))
    save_pngs(images, png_dir, piece.start)


# ---------------------------------------------------------------------------- driver
def _run_parameters(model_dir: Path, spec: SampleSpec) -> dict:
    """The manifest's `run`: what decides the samples, in the form it takes in JSON (tuples -> lists, ...)."""
    decoder = spec.decoder
    run = {
        "model_sha256": _model_fingerprint(model_dir),
        "schedule": spec.schedule,
        "sampler": spec.sampler,
        "steps": int(spec.steps),
        "num_samples": int(spec.num_samples),
        "shard_size": int(spec.shard_size),
        "seed": int(spec.seed),
        "guidance_scale": float(spec.guidance_scale),
        "num_classes_for_labels": spec.num_classes_for_labels,
        "sampler_kwargs": dict(spec.sampler_kwargs or {}),
        "captions": None if spec.captions is None else spec.captions.fingerprint(),
        "decoder": None
        if decoder is None
        else {"vae_sha256": _source_fingerprint(str(decoder.vae)), "scale_factor": float(decoder.scale_factor)},
    }
    return json.loads(json.dumps(run))


class _ShardManifest:
    """The driver's shards.json: which shards are done, rewritten (atomically) as each one finishes."""

    def __init__(self, out_dir: Path, run: dict, num_shards: int):
        self.out_dir = out_dir
        manifest = read_manifest(out_dir)
        if manifest is not None and manifest.get("run") != run:
            log.warning("%s: run parameters or model changed, recomputing every shard", out_dir)
            manifest = None
        self.data = manifest or {"format": FORMAT, "run": run, "num_shards": num_shards, "shards": {}}

    def verified(self, piece: Piece) -> dict | None:
        """The shard's entry if the file on disk matches it (range and sha256)."""
        entry = self.data["shards"].get(str(piece.index))
        path = self.out_dir / shard_name(piece.index)
        if (
            entry
            and entry.get("start") == piece.start
            and entry.get("count") == piece.count
            and path.is_file()
            and sha256_file(path) == entry.get("sha256")
        ):
            return entry
        if entry:
            log.warning("shard %d: missing or does not match its sha256, recomputing", piece.index)
        return None

    def keep(self, reused: list[Piece]) -> None:
        """List only the verified shards (before any shard is recomputed)."""
        self.data["shards"] = {str(p.index): self.data["shards"][str(p.index)] for p in reused}
        self.write()

    def record(self, piece: Piece, entry: dict) -> None:
        self.data["shards"][str(piece.index)] = entry
        self.data["shards"] = dict(sorted(self.data["shards"].items(), key=lambda kv: int(kv[0])))
        self.write()

    def write(self) -> None:
        write_json(self.out_dir / MANIFEST_NAME, self.data, sort_keys=True)


def _prepare(job: _ShardJob, manifest: _ShardManifest, reused: list[Piece], todo: list[Piece]) -> None:
    """Before sampling: the manifest lists only verified shards, a stale merge goes, and the PNG directory holds
    no sample beyond N and every PNG of a reused shard."""
    manifest.keep(reused)
    if todo:
        (job.out_dir / MERGED_NAME).unlink(missing_ok=True)  # it would no longer match the shards
    if job.png_dir is None:
        return
    job.png_dir.mkdir(parents=True, exist_ok=True)
    for p in job.png_dir.glob("*.png"):  # left by an earlier, larger run
        if not p.stem.isdigit() or int(p.stem) >= job.run["num_samples"]:
            p.unlink()
    for piece in reused:
        _ensure_pngs(job.out_dir, job.png_dir, piece)


def sample_to_shards(
    model_dir: str | Path, out_dir: str | Path, spec: SampleSpec, how: SamplingRun, png_dir: str | Path | None = None
) -> dict:
    """Sample `spec.num_samples` images from the UViT in `model_dir` into resumable shards in `out_dir`.

    how.num_workers > 1 starts Ray (ray.init(num_cpus=num_workers) unless it is already initialised; it is
    left running). png_dir: also write each sample as png_dir/{i:06d}.png (stale ones beyond N are removed).
    Returns a summary: shards computed and reused, seconds, images/s, manifest path.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = Workers(how.num_workers, how.use_gpu)
    run = _run_parameters(model_dir, spec)
    remove_temps(out_dir, "samples-*.npz")  # left by an interrupted run
    manifest = _ShardManifest(out_dir, run, len(shard_ranges(spec.num_samples, spec.shard_size)))
    job = _ShardJob(
        out_dir, run, how.batch_size, spec.captions, spec.decoder, None if png_dir is None else Path(png_dir)
    )

    def local():
        model = UViT.from_pretrained(model_dir, device=how.device)
        return lambda piece: _sample_shard(model, job, piece, how.device)

    work = ShardedWork(
        total=spec.num_samples,
        piece_size=spec.shard_size,
        verified=manifest.verified,
        local=local,
        remote=RemoteTask(_sample_shard_remote, lambda: (read_tree(model_dir), job)),
        prepare=functools.partial(_prepare, job, manifest),
        finished=manifest.record,
        progress=Progress(f"sample {spec.sampler} x{spec.steps}", "img", how.progress),
        receive=functools.partial(_receive_shard, job),
    )
    done = run_sharded(work, workers)
    return {
        "out_dir": str(out_dir),
        "manifest": str(out_dir / MANIFEST_NAME),
        "num_samples": spec.num_samples,
        "num_shards": len(done.pieces),
        "computed": done.computed,
        "reused": done.reused,
        "seconds": done.seconds,
        "images_per_s": done.rows_computed / done.seconds if done.rows_computed else 0.0,
        "model_sha256": run["model_sha256"],
    }


# ---------------------------------------------------------------------------- merge
def verify_shards(out_dir: str | Path) -> dict:
    """The manifest, after checking every shard is listed, present and matches its sha256."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise ShardIntegrityError(f"{out_dir / MANIFEST_NAME}: missing or not a sample-shard manifest")
    run = manifest["run"]
    ranges = shard_ranges(run["num_samples"], run["shard_size"])
    for k, (start, count) in enumerate(ranges):
        entry = manifest["shards"].get(str(k))
        path = out_dir / shard_name(k)
        if entry is None:
            raise ShardIntegrityError(f"shard {k} is not complete: run sample_to_shards again to finish it")
        if not path.is_file():
            raise ShardIntegrityError(f"{path} is missing")
        if (entry["start"], entry["count"]) != (start, count) or sha256_file(path) != entry["sha256"]:
            raise ShardIntegrityError(f"{path} does not match its manifest entry (sha256 or range)")
    return manifest


def merge_shards(out_dir: str | Path, path: str | Path | None = None) -> np.ndarray:
    """Verify all shards, concatenate them in sample order and write one `samples.npz`.

    Returns the images, uint8 (N, C, H, W); the file (default out_dir/samples.npz) holds them
    as NHWC `arr_0` plus `labels` (class models) and the shards' extras (`caption_rows`,
    `captions`), as `save_samples` writes.
    """
    out_dir = Path(out_dir)
    manifest = verify_shards(out_dir)
    images, labels, extras = [], [], []
    for k in range(manifest["num_shards"]):
        x, y = load_samples(out_dir / shard_name(k))
        if x.shape[0] != manifest["shards"][str(k)]["count"]:
            raise ShardIntegrityError(
                f"shard {k} holds {x.shape[0]} samples, the manifest says {manifest['shards'][str(k)]['count']}"
            )
        images.append(x)
        labels.append(y)
        extras.append(load_sample_extras(out_dir / shard_name(k)))
    merged = np.concatenate(images)
    merged_labels = None if any(y is None for y in labels) else np.concatenate(labels)
    merged_extras = {key: np.concatenate([e[key] for e in extras]) for key in extras[0]}
    save_samples(Path(path) if path is not None else out_dir / MERGED_NAME, merged, merged_labels, merged_extras)
    return merged
