"""Sharded, resumable sampling for scoring: 50k samples as independent, verifiable shards.

    out_dir/
      samples-00000.npz   samples [0, S)    uint8 NHWC `arr_0` + `labels` (save_samples' layout), and
                                            for text-to-image `caption_rows` + `captions`
      samples-00001.npz   samples [S, 2S)
      ...
      manifest.json       run parameters + per shard {file, start, count, sha256}
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
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from uvit.evaluate.captions import CaptionSet
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
from uvit.fileio import remove_temps, sha256_dir, sha256_file, sha256_listing, write_json
from uvit.models import UViT
from uvit.models.uvit import CONFIG_NAME, WEIGHTS_NAME
from uvit.parallel import for_each_completed, init_ray_for_tasks

__all__ = [
    "MANIFEST_NAME",
    "MERGED_NAME",
    "ShardIntegrityError",
    "shard_name",
    "shard_ranges",
    "sample_to_shards",
    "merge_shards",
    "read_manifest",
    "verify_shards",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
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
    return [(s, min(shard_size, num_samples - s)) for s in range(0, num_samples, shard_size)]


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


@functools.lru_cache(maxsize=2)
def _load_decoder(vae: str, scale_factor: float, device: str):
    """The VAE once per process (Ray workers sample several shards)."""
    from uvit.encoders.vae import load_vae

    return load_vae(vae, scale_factor=scale_factor, device=device)


# ---------------------------------------------------------------------------- one shard
def _sample_shard(
    model: UViT,
    out_dir: Path,
    k: int,
    start: int,
    count: int,
    run: dict,
    batch_size: int,
    device: str,
    captions: CaptionSet | None = None,
    decoder: dict | None = None,
    png_dir: Path | None = None,
) -> dict:
    """Generate samples [start, start + count) (decoded to images for latent models), write their
    PNGs, then shard k atomically; returns its manifest entry."""
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
        from uvit.encoders.vae import decode

        vae = _load_decoder(decoder["vae"], decoder["scale_factor"], device)
        x = decode(vae, x.to(device), batch_size=decoder.get("batch_size", 50)).cpu()
    images = to_uint8(x)
    if png_dir is not None:
        save_pngs(images, png_dir, start)
    extras = captions.metadata(start, count) if captions is not None else None
    path = save_samples(out_dir / shard_name(k), images, None if labels is None else labels.numpy(), extras)
    return {"file": path.name, "start": start, "count": count, "sha256": sha256_file(path)}


def _shard_task(
    model_dir: str,
    out_dir: str,
    k: int,
    start: int,
    count: int,
    run: dict,
    batch_size: int,
    device: str,
    threads: int,
    captions: CaptionSet | None,
    decoder: dict | None,
    png_dir: str | None,
) -> tuple[int, dict]:
    """A Ray task: load the model, sample one shard."""
    if device == "cpu":
        torch.set_num_threads(threads)
    model = UViT.from_pretrained(model_dir, device=device)
    return k, _sample_shard(
        model,
        Path(out_dir),
        k,
        start,
        count,
        run,
        batch_size,
        device,
        captions,
        decoder,
        None if png_dir is None else Path(png_dir),
    )


def _ensure_pngs(out_dir: Path, png_dir: Path, k: int, start: int, count: int) -> None:
    """Rewrite the PNGs of a reused shard that are missing (e.g. deleted by hand)."""
    if all((png_dir / png_name(i)).is_file() for i in range(start, start + count)):
        return
    images, _ = load_samples(out_dir / shard_name(k))
    save_pngs(images, png_dir, start)


# ---------------------------------------------------------------------------- driver
def sample_to_shards(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    schedule: str,
    sampler: str,
    steps: int,
    num_samples: int,
    shard_size: int,
    seed: int,
    guidance_scale: float,
    num_classes_for_labels: int | None,
    batch_size: int,
    num_workers: int = 1,
    use_gpu: bool = False,
    device: str = "cpu",
    sampler_kwargs: dict | None = None,
    captions: CaptionSet | None = None,
    decoder: dict | None = None,
    png_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Sample `num_samples` images from the UViT in `model_dir` into resumable shards in `out_dir`.

    num_classes_for_labels: K real classes (labels i % K, independent of sharding) for a
        class-conditional model; None for unconditional ones.
    num_workers: 1 samples in this process on `device`; > 1 runs one Ray task per shard
        (ray.init(num_cpus=num_workers) unless Ray is already initialised; it is left running),
        each on one CPU thread, or on "cuda" with one GPU per task when use_gpu (then `device`
        is not used). batch_size and num_workers do not change the samples, so they are not
        part of the run parameters that decide whether existing shards are reused.
    captions: for a text-to-image model, the caption rows of samples 0..N-1 (guidance uses the
        split's empty context); their fingerprint is part of the run parameters.
    decoder: for a latent model, {"vae": file, directory or hub id, "scale_factor": float}: shards
        hold decoded images. The VAE's bytes are part of the run parameters.
    png_dir: also write each sample as png_dir/{i:06d}.png (stale ones beyond N are removed).
    Returns a summary: shards computed and reused, seconds, images/s, manifest path.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if num_classes_for_labels is not None and num_classes_for_labels < 1:
        raise ValueError(f"num_classes_for_labels must be >= 1 or None, got {num_classes_for_labels}")
    ranges = shard_ranges(num_samples, shard_size)
    run = {
        "model_sha256": _model_fingerprint(model_dir),
        "schedule": schedule,
        "sampler": sampler,
        "steps": int(steps),
        "num_samples": int(num_samples),
        "shard_size": int(shard_size),
        "seed": int(seed),
        "guidance_scale": float(guidance_scale),
        "num_classes_for_labels": num_classes_for_labels,
        "sampler_kwargs": dict(sampler_kwargs or {}),
        "captions": None if captions is None else captions.fingerprint(),
        "decoder": None
        if decoder is None
        else {"vae_sha256": _source_fingerprint(str(decoder["vae"])), "scale_factor": float(decoder["scale_factor"])},
    }
    run = json.loads(json.dumps(run))  # the form it takes in the manifest (tuples -> lists, ...)
    remove_temps(out_dir, "samples-*.npz")  # left by an interrupted run

    manifest = read_manifest(out_dir)
    if manifest is not None and manifest.get("run") != run:
        log.warning("%s: run parameters or model changed, recomputing every shard", out_dir)
        manifest = None
    if manifest is None:
        manifest = {"format": FORMAT, "run": run, "num_shards": len(ranges), "shards": {}}
    done: list[int] = []
    for k, (start, count) in enumerate(ranges):
        entry = manifest["shards"].get(str(k))
        path = out_dir / shard_name(k)
        if (
            entry
            and entry.get("start") == start
            and entry.get("count") == count
            and path.is_file()
            and sha256_file(path) == entry.get("sha256")
        ):
            done.append(k)
        else:
            if entry:
                log.warning("shard %d: missing or does not match its sha256, recomputing", k)
            manifest["shards"].pop(str(k), None)
    manifest["shards"] = {str(k): manifest["shards"][str(k)] for k in done}
    write_json(out_dir / MANIFEST_NAME, manifest, sort_keys=True)
    todo = [k for k in range(len(ranges)) if k not in set(done)]
    if todo:
        (out_dir / MERGED_NAME).unlink(missing_ok=True)  # it would no longer match the shards
    if png_dir is not None:
        png_dir = Path(png_dir)
        png_dir.mkdir(parents=True, exist_ok=True)
        for p in png_dir.glob("*.png"):  # left by an earlier, larger run
            if not p.stem.isdigit() or int(p.stem) >= num_samples:
                p.unlink()
        for k in done:
            _ensure_pngs(out_dir, png_dir, k, *ranges[k])

    t0 = time.perf_counter()
    new_images = 0
    bar = tqdm(
        total=num_samples,
        initial=sum(ranges[k][1] for k in done),
        desc=f"sample {sampler} x{steps}",
        unit="img",
        disable=not progress,
        ascii=True,
    )

    def finished(k: int, entry: dict) -> None:
        nonlocal new_images
        manifest["shards"][str(k)] = entry
        manifest["shards"] = dict(sorted(manifest["shards"].items(), key=lambda kv: int(kv[0])))
        write_json(out_dir / MANIFEST_NAME, manifest, sort_keys=True)
        new_images += entry["count"]
        bar.update(entry["count"])
        bar.set_postfix(img_per_s=f"{new_images / max(time.perf_counter() - t0, 1e-9):.1f}", refresh=False)

    try:
        if todo and num_workers == 1:
            model = UViT.from_pretrained(model_dir, device=device)
            for k in todo:
                start, count = ranges[k]
                finished(
                    k,
                    _sample_shard(model, out_dir, k, start, count, run, batch_size, device, captions, decoder, png_dir),
                )
        elif todo:
            import ray

            init_ray_for_tasks(num_workers, use_gpu)
            task = ray.remote(_shard_task).options(num_cpus=1, num_gpus=1 if use_gpu else 0, max_retries=1)
            dev = "cuda" if use_gpu else "cpu"
            pending = {
                task.remote(
                    str(model_dir),
                    str(out_dir),
                    k,
                    *ranges[k],
                    run,
                    batch_size,
                    dev,
                    1,
                    captions,
                    decoder,
                    None if png_dir is None else str(png_dir),
                ): k
                for k in todo
            }
            for_each_completed(pending, lambda k, result: finished(*result))
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    return {
        "out_dir": str(out_dir),
        "manifest": str(out_dir / MANIFEST_NAME),
        "num_samples": num_samples,
        "num_shards": len(ranges),
        "computed": todo,
        "reused": done,
        "seconds": seconds,
        "images_per_s": new_images / seconds if new_images else 0.0,
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
