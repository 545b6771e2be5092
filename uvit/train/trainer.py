"""Distributed U-ViT training through Ray Train's TorchTrainer (gloo on CPU, NCCL on GPU).

The driver (`run_training`) starts or joins Ray, launches `train_loop_per_worker` on
`train.num_workers` workers and, when it finishes, exports the final weights, EMA weights,
per-step metrics and a summary into `runs/<benchmark>/train/`.

Each worker streams its share of every step's batch from the memory-mapped shards
(uvit/train/data.py), holds the model with DDP or FSDP2 (uvit/train/strategy.py) and, on rank 0,
logs metrics, TensorBoard, sample grids and periodic FID (uvit/train/monitor.py).
Checkpoints go through Ray's checkpointing to `runs/<benchmark>/ray/<config-hash>/`, or to
`train.storage_path` (a directory or `s3://`, uvit/train/checkpoint_storage.py), uploaded in the
background. A worker that dies is replaced and the run continues from the last checkpoint
(`train.max_failures`); `resume=True` continues a previous invocation's run.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn

from uvit.config import BenchmarkConfig
from uvit.diffusion import make_schedule
from uvit.fileio import read_json_or_none
from uvit.models import UViT
from uvit.paths import BenchmarkPaths
from uvit.train.checkpoint import TrainingState, checkpoint_step, read_checkpoint, save_checkpoint
from uvit.train.data import ShardGather, StreamingLoader, training_field
from uvit.train.fingerprint import (  # noqa: F401  (re-exported)
    contexts_data_dir,
    train_fingerprint,
    training_data_dir,
)
from uvit.train.monitor import (  # noqa: F401  (METRICS_FIELDS re-exported)
    METRICS_FIELDS,
    MetricsLog,
    peak_memory_gib,
    sample_grid,
)
from uvit.train.step import (
    EMA,
    DrawConfig,
    StepConfig,
    StepStats,
    build_optimizer,
    train_step,
    unwrap,
    warmup_lambda,
)
from uvit.train.strategy import Strategy

if TYPE_CHECKING:
    from uvit.train.checkpoint_storage import Storage


# ---------------------------------------------------------------------------- data
def load_training_data(cfg: BenchmarkConfig, data_dir: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The whole training split in memory as tensors, and labels (N,) or None (small data and
    tests; training streams batches from the shards instead: uvit/train/data.py).

    Pixel benchmarks: images (N, C, H, W) float32 in [-1, 1]. Latent benchmarks: the stored VAE
    moments (N, 2C, h, w) float32, from which every step samples its latents. Text-to-image
    (MS-COCO): the moments and None; the captions' CLIP contexts stay in their caption split
    (`contexts_data_dir`), from which `ShardGather` reads each step's chosen captions.
    """
    from uvit.data.shards import ShardedArrays

    split = ShardedArrays(data_dir / "train")
    labels = split.field("labels") if "labels" in split.field_names and cfg.data.num_classes > 0 else None
    y = torch.from_numpy(np.array(labels)).long() if labels is not None else None
    if "moments" in split.field_names:
        return torch.from_numpy(np.array(split.field("moments"))).float(), y
    images = np.array(split.field("images"))
    if images.dtype != np.uint8:
        raise ValueError(f"{data_dir / 'train'}: expected uint8 images or VAE moments, got {images.dtype}")
    return torch.from_numpy(images).float().div_(127.5).sub_(1.0), y


# ---------------------------------------------------------------------------- worker
@dataclass(frozen=True)
class FIDInputs:
    """What periodic FID reads, resolved by the driver: the training images' split directory, the
    digits classifier's directory, and the "step,fid" log that rank 0 appends to."""

    images: str
    classifier: str
    log: str


@dataclass(frozen=True)
class WorkerConfig:
    """What the driver hands every Ray Train worker (plain data: it is pickled to each).

    benchmark: the `BenchmarkConfig` as `model_dump` data (each worker validates it again);
    data_dir / contexts_dir: absolute parents of the training split and (text-to-image) of its
    caption split; tensorboard_dir, samples_dir and fid are None when off; resume_from: the
    `ray.train.Checkpoint` of an earlier invocation to continue, or None.
    """

    benchmark: dict[str, Any]
    data_dir: str
    contexts_dir: str | None = None
    tensorboard_dir: str | None = None
    samples_dir: str | None = None
    fid: FIDInputs | None = None
    resume_from: Any = None


@dataclass(frozen=True)
class _Place:
    """Where a worker runs: its rank among `world` workers, and its device."""

    rank: int
    world: int
    device: torch.device


@dataclass(frozen=True)
class _Learner:
    """A worker's trainable state: the wrapped model `net` and its EMA, AdamW, the LR schedule,
    the strategy that wraps them, and `start`, the first step to run (the restored step, or 0)."""

    strategy: Strategy
    net: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    start: int


class _Frozen:
    """A state dict standing in for an optimizer/scheduler when saving (FSDP: gathered state)."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def train_loop_per_worker(config: WorkerConfig) -> None:
    """Runs in every Ray Train worker: build, (restore), train, checkpoint through Ray."""
    cfg = BenchmarkConfig.model_validate(config.benchmark)
    place = _place_worker(cfg.train)
    gather = _shard_gather(cfg, config)
    scratch = Path(tempfile.mkdtemp(prefix=f"uvit-rank{place.rank}-"))  # metrics.csv, checkpoints to upload
    learner = _build_learner(cfg, place, _restore(config, scratch, place.device))
    worker = _Worker(cfg, config, place, learner, scratch)
    draws, step_config = _step_configs(cfg, gather, place.device)
    worker.train(gather, draws, step_config)
    shutil.rmtree(scratch, ignore_errors=True)


def _place_worker(tc) -> _Place:
    """This worker's rank, world size and device; sets its torch threads (and TF32 on CUDA)."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(tc.threads_per_worker)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return _Place(rank, world, device)


def _shard_gather(cfg: BenchmarkConfig, config: WorkerConfig) -> ShardGather:
    """Row gathers from the training split (and, text-to-image, its caption split)."""
    text = cfg.text_to_image
    split = Path(config.data_dir) / "train"
    contexts = Path(config.contexts_dir) / "train" if text else None
    with_labels = cfg.data.num_classes > 0 and not text
    return ShardGather(split, training_field(split), with_labels=with_labels, contexts_dir=contexts)


def _restore(config: WorkerConfig, scratch: Path, device: torch.device) -> dict | None:
    """The checkpoint to continue from, read onto `device` (`read_checkpoint`'s dict), or None:
    Ray's latest after a worker failure, else the driver's `resume_from`. Its metrics.csv is
    copied into `scratch`, where the metrics log continues it."""
    import ray.train

    restored = ray.train.get_checkpoint() or config.resume_from  # a Ray Checkpoint
    if restored is None:
        return None
    with _local_copy(restored, scratch / "restore") as d:
        ckpt = read_checkpoint(d, device)
        if (Path(d) / "metrics.csv").is_file():
            shutil.copy2(Path(d) / "metrics.csv", scratch / "metrics.csv")
    return ckpt


def _build_learner(cfg: BenchmarkConfig, place: _Place, ckpt: dict | None) -> _Learner:
    """The model (seeded by train.seed), EMA, AdamW and LR schedule, restored from `ckpt` if any.

    The weights are restored into the plain model first, then wrapped: both strategies load
    full state dicts."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = UViT(cfg.uvit_config()).to(place.device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    strategy = Strategy(tc.strategy, place.world, place.device)
    ema = strategy.make_ema(model, tc.ema_decay, ckpt["ema"] if ckpt is not None else None)
    net = strategy.wrap(model)
    optimizer = build_optimizer(net, tc.lr, tc.weight_decay, tuple(tc.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(tc.warmup_steps))
    start = 0
    if ckpt is not None:
        strategy.load_optimizer(net, optimizer, ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start = ckpt["step"]
    if tc.compile:
        net = torch.compile(net)
    return _Learner(strategy, net, ema, optimizer, scheduler, start)


def _step_configs(cfg: BenchmarkConfig, gather: ShardGather, device: torch.device) -> tuple[DrawConfig, StepConfig]:
    """What every step of `cfg` draws, and the recipe every step trains with."""
    tc, uconf = cfg.train, cfg.uvit_config()
    text = uconf.clip_dim is not None
    schedule = make_schedule(cfg.diffusion.schedule)
    p_uncond = cfg.diffusion.p_uncond if uconf.num_classes > 0 or text else 0.0
    latent_scale = cfg.encode.scale_factor if cfg.encode is not None else None
    sample_shape = (uconf.in_chans, uconf.img_size, uconf.img_size)
    draws = DrawConfig(
        tc.seed, tc.batch_size, sample_shape, schedule, p_uncond, latent_scale is not None, tc.random_flip
    )
    step = StepConfig(
        schedule,
        null_class=uconf.num_classes - 1 if p_uncond > 0 and not text else None,
        empty_context=gather.empty_context.to(device) if text else None,  # dropout's stand-in (not zeros)
        grad_clip=tc.grad_clip,
        autocast_dtype={"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[tc.precision],
        latent_scale=latent_scale,
    )
    return draws, step


class _Worker:
    """One worker's training run: the steps, and around them rank 0's metrics log, TensorBoard,
    sample grids and periodic FID, and the checkpoints every rank reports to Ray."""

    def __init__(self, cfg: BenchmarkConfig, config: WorkerConfig, place: _Place, learner: _Learner, scratch: Path):
        from uvit.train.monitor import PeriodicFID, TensorBoard

        self.cfg, self.tc, self.place, self.learner, self.scratch = cfg, cfg.train, place, learner, scratch
        metrics_path = self.metrics_path = scratch / "metrics.csv"
        rank0 = place.rank == 0
        self.log = MetricsLog(metrics_path, resume_step=learner.start) if rank0 else None
        self.tb = TensorBoard(config.tensorboard_dir if rank0 else None, resume_step=learner.start)
        self.samples_dir = Path(config.samples_dir) if config.samples_dir else None
        self.fid_inputs = config.fid
        self.periodic_fid = None
        if config.fid is not None and rank0:  # the reference statistics are computed once, here
            device = "cuda" if place.device.type == "cuda" else "cpu"
            self.periodic_fid = PeriodicFID(
                cfg, self.tc.fid_samples, config.fid.images, config.fid.classifier, device=device
            )
        self.shadow: dict[str, UViT] = {}  # rank 0, FSDP: full-weight CPU copies to save / sample from

    def train(self, gather: ShardGather, draws: DrawConfig, step_config: StepConfig) -> None:
        """Steps [learner.start, train.steps), streamed from `gather`, with logs and checkpoints."""
        from tqdm import tqdm

        tc, place, learner = self.tc, self.place, self.learner
        scaler = torch.amp.GradScaler(place.device.type) if tc.precision == "fp16" else None
        self.bar = tqdm(
            total=tc.steps,
            initial=learner.start,
            disable=place.rank != 0,
            desc=f"train {self.cfg.name}",
            unit="step",
            mininterval=3.0,
            ascii=True,
        )
        self.window_start, self.window_images, self.t_start = time.perf_counter(), 0, time.perf_counter()
        loader = StreamingLoader(
            gather, draws, learner.start, tc.steps, place.rank, place.world, place.device, tc.prefetch
        )
        with loader:
            for batch in loader:
                stats = train_step(
                    learner.net, learner.optimizer, learner.scheduler, learner.ema, batch, step_config, scaler
                )
                self.after_step(batch.step + 1, stats, len(batch.x))
        self.bar.close()
        self.tb.close()

    def after_step(self, done: int, stats: StepStats, rows: int) -> None:
        """Log, sample, score and checkpoint after `done` steps, as train.* asks."""
        tc = self.tc
        self.window_images += tc.batch_size
        self.bar.update(1)
        logging_step = done % tc.log_every == 0 or done == tc.steps
        checkpoint_step = done % tc.checkpoint_every == 0 or done == tc.steps
        if logging_step or checkpoint_step:  # the same steps on every rank: a collective is safe
            loss = global_mean_loss(stats.loss_t, rows)
        if logging_step:
            self.log_metrics(done, loss, stats)
        if tc.sample_every and done % tc.sample_every == 0:
            self.grid(done)
        if self.fid_inputs and done % tc.fid_every == 0:
            self.fid(done)
        if checkpoint_step:
            self.report({"step": done, "loss": loss}, done)

    def log_metrics(self, done: int, loss: float, stats: StepStats) -> None:
        """One metrics row (rank 0: metrics.csv and TensorBoard); throughput since the last row."""
        now = time.perf_counter()
        row = {
            "step": done,
            "loss": loss,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "images_per_s": self.window_images / (now - self.window_start),
            "elapsed_s": now - self.t_start,
            "peak_mem_gib": peak_memory_gib(self.place.device),
        }
        if self.log is not None:
            self.log.append(row)
            self.tb.scalars(done, {k: v for k, v in row.items() if k != "step"})
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.window_start, self.window_images = now, 0

    def full_copy(self, which: str, module: nn.Module) -> UViT | None:
        """`module` itself (DDP) or, under FSDP, a plain copy with its gathered weights on rank 0
        and None elsewhere (a collective: every rank calls it)."""
        strategy = self.learner.strategy
        if not strategy.sharded:
            return unwrap(module)
        sd = strategy.model_state(module)
        if self.place.rank != 0:
            return None
        if which not in self.shadow:
            self.shadow[which] = UViT(self.cfg.uvit_config())
        self.shadow[which].load_state_dict(sd)
        return self.shadow[which]

    def on_ema(self, wanted: bool, fn: Callable[[UViT], Any]) -> Any:
        """`fn(ema)` on rank 0 with the full EMA weights on this device when `wanted`, else None;
        every rank calls this (the FSDP gather is a collective)."""
        ema_full = self.full_copy("ema", self.learner.ema.model)
        if self.place.rank != 0 or not wanted:
            return None
        out = fn(ema_full.to(self.place.device))
        if self.learner.strategy.sharded:
            ema_full.cpu()  # the full copy lives on the host between uses
        return out

    def grid(self, step: int) -> None:
        """A grid of EMA samples to samples_dir and TensorBoard."""
        path = self.on_ema(
            self.samples_dir is not None,
            lambda ema: sample_grid(self.cfg, ema, self.samples_dir / f"step_{step:07d}.png"),
        )
        if path is not None:
            self.tb.image("samples/ema", path, step)

    def fid(self, step: int) -> None:
        """The EMA model's periodic FID, to TensorBoard and the FID log."""
        value = self.on_ema(self.periodic_fid is not None, lambda ema: self.periodic_fid(ema))
        if value is None:
            return
        self.tb.scalars(step, {"fid": value}, prefix="eval")
        with open(self.fid_inputs.log, "a") as f:
            f.write(f"{step},{value}\n")
        print(f"step {step}: FID ({self.tc.fid_samples} samples, {self.cfg.score.feature_extractor}) {value:.3f}")

    def report(self, metrics: dict[str, float], step: int) -> None:
        """Report `metrics` to Ray with a checkpoint of step `step` (rank 0 writes it)."""
        import ray.train

        learner, place, tc = self.learner, self.place, self.tc
        model_full, ema_full = self.full_copy("model", learner.net), self.full_copy("ema", learner.ema.model)
        optim_state = learner.strategy.optimizer_state(learner.net, learner.optimizer)
        checkpoint = None
        if place.rank == 0:
            # Not a TemporaryDirectory: with asynchronous upload Ray deletes it once uploaded.
            directory = Path(tempfile.mkdtemp(dir=self.scratch)) / "checkpoint"
            state = TrainingState(model_full, ema_full, _Frozen(optim_state), learner.scheduler, step)
            save_checkpoint(directory, state, self.metrics_path)
            hardware = worker_hardware(place.device, place.world, tc)
            (directory / WORKER_FILE).write_text(json.dumps(hardware, indent=2) + "\n")
            checkpoint = ray.train.Checkpoint.from_directory(str(directory))
        # Asynchronous upload lets training go on while the files travel; the last one is
        # synchronous, which also waits for the earlier uploads (reports commit in order).
        sync = not tc.async_checkpoint or step == tc.steps
        mode = ray.train.CheckpointUploadMode.SYNC if sync else ray.train.CheckpointUploadMode.ASYNC
        ray.train.report(
            metrics, checkpoint=checkpoint, checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=True
        )  # a barrier: every rank calls it


def global_mean_loss(loss: torch.Tensor, rows: int) -> float:
    """The step's loss over the whole global batch: each rank's mean `loss` (0-d) weighted by its
    `rows`, summed across ranks (a collective: every rank calls it at the same steps)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(loss)
    both = torch.stack([loss.detach().float() * rows, torch.tensor(float(rows), device=loss.device)])
    dist.all_reduce(both)
    return float(both[0] / both[1])


@contextlib.contextmanager
def _local_copy(checkpoint, target: Path):
    """A Ray Checkpoint as a local directory: in place when it is on a local filesystem, else
    downloaded into this worker's own `target` (Checkpoint.as_directory shares one temp folder
    between the workers of a node, and a second reader saw half-deleted files)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path
        return
    try:
        yield checkpoint.to_directory(str(target))
    finally:
        shutil.rmtree(target, ignore_errors=True)


# ---------------------------------------------------------------------------- driver
def _init_ray(cfg: BenchmarkConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    env = {"OMP_NUM_THREADS": str(cfg.train.threads_per_worker), "RAY_AUTH_MODE": "disabled"}
    if os.environ.get("RAY_ADDRESS"):  # a running cluster (`ray start --head`, `ray job submit`)
        ray.init(runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        # One extra logical CPU for Ray Train's controller actor; workers get their threads each.
        # No dashboard: nothing here reads the State API it serves (see `_torch_trainer`), and it
        # costs seconds of start-up and a busy process on a small machine.
        cpus = cfg.train.num_workers * cfg.train.threads_per_worker + 1
        for attempt in range(3):  # a loaded machine can outlast the local node's start-up wait
            try:
                ray.init(num_cpus=cpus, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=True)
                return
            except Exception as e:
                if "timed out during startup" not in str(e) or attempt == 2:
                    raise
                print(f"Ray's local node did not start in time ({e}); trying again", file=sys.stderr)
                ray.shutdown()


def _torch_trainer() -> type:
    """Ray's TorchTrainer without Ray Train's placement-group cleaner.

    The cleaner is a detached actor that polls the State API for the controller and removes the
    run's placement group when the controller looks dead. Ray 2.60 takes an empty answer (which a
    loaded State API gives) for death, so on a busy machine it tore down a healthy run's workers
    ("Destroying worker since its placement group was removed"). The job driver, `run_training`,
    owns the placement group's lifetime anyway: Ray removes it when the driver's job ends.
    """
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self) -> list:
            return [c for c in super()._create_default_callbacks() if not isinstance(c, PlacementGroupCleanerCallback)]

    return Trainer


def latest_checkpoint(storage, max_step: int | None = None) -> str | None:
    """The newest complete checkpoint (all runs) under a storage location (a local Path or a
    `uvit.train.checkpoint_storage.Storage`, S3 included) whose step is at most `max_step`, or None.
    Incomplete ones (no state.json) are skipped."""
    from uvit.train.checkpoint_storage import Storage, find_checkpoints, resolve_storage

    if not isinstance(storage, Storage):
        storage = resolve_storage(storage)
    for step, _, path in find_checkpoints(storage):
        if max_step is None or step <= max_step:
            return path
    return None


WORKER_FILE = "worker.json"  # in every checkpoint: the hardware rank 0 trained on


def worker_hardware(device: torch.device, world_size: int, tc) -> dict[str, Any]:
    """What the workers run on, as rank 0 sees it (the driver may be another machine)."""
    cpu = platform.processor() or platform.machine()
    info: dict[str, Any] = {
        "device": device.type,
        "num_workers": world_size,
        "host_cpus": os.cpu_count(),
        "cpu": cpu,
        "threads_per_worker": tc.threads_per_worker,
    }
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), gpus_on_host=torch.cuda.device_count())
        info["description"] = f"{world_size}x {info['gpu']} ({info['gpus_on_host']} GPU(s) on rank 0's host)"
    else:
        info["description"] = (
            f"CPU ({info['host_cpus']} cores, {cpu}), {world_size} worker(s) x {tc.threads_per_worker} thread(s)"
        )
    return info


def hardware_description(cfg: BenchmarkConfig, checkpoint: Path | None = None) -> str:
    """The workers' hardware from a checkpoint's worker.json; this process's, for older checkpoints."""
    if checkpoint is not None and (checkpoint / WORKER_FILE).is_file():
        return json.loads((checkpoint / WORKER_FILE).read_text())["description"]
    device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
    return worker_hardware(device, cfg.train.num_workers, cfg.train)["description"]


def run_training(
    cfg: BenchmarkConfig, paths: BenchmarkPaths, *, resume: bool = True, storage_path: str | None = None
) -> dict[str, Any]:
    """Train `cfg` with Ray Train and export the result to `paths.train`. Returns the summary.

    Checkpoints go to `storage_path`, else `train.storage_path` (a directory or s3://bucket/prefix),
    else runs/<benchmark>/ray, under a folder per trajectory fingerprint. With `resume` (the
    default) the newest good checkpoint of the same trajectory (see `train_fingerprint`) at or
    below `train.steps` is continued; resuming is exact, so the result equals a fresh run's.
    TensorBoard logs and sample grids always stay local, in runs/<benchmark>/ray/<fingerprint>/.
    """
    import ray.train

    _check_monitoring(cfg)
    plan = _plan_run(cfg, paths, storage_path)
    last = latest_checkpoint(plan.storage, max_step=cfg.train.steps) if resume else None
    if last is None:
        return _fit(cfg, paths, plan)
    resume_from = ray.train.Checkpoint(last, filesystem=plan.storage.fs)
    with resume_from.as_directory() as d:
        step = checkpoint_step(d)
        print(f"resuming from {_uri(plan.storage, last)} (step {step})")
        if step == cfg.train.steps:  # already trained this far: export, nothing to run
            run_dir = _uri(plan.storage, str(Path(last).parent))
            return _export(cfg, paths, Path(d), wall=None, run_dir=run_dir, fid_log=plan.local / "fid.csv")
    return _fit(cfg, paths, replace(plan, worker=replace(plan.worker, resume_from=resume_from)))


def _check_monitoring(cfg: BenchmarkConfig) -> None:
    """Refuse what the training monitor cannot do for `cfg` before anything starts."""
    tc = cfg.train
    if cfg.text_to_image and (tc.sample_every or tc.fid_every):
        raise NotImplementedError(
            f"{cfg.name}.train: sample grids and periodic FID during text-to-image training "
            "(they need captions) are not supported; set sample_every and fid_every to 0"
        )


@dataclass(frozen=True)
class _RunPlan:
    """One invocation's places: checkpoints under `storage` (the trajectory's folder), rank 0's
    TensorBoard logs, sample grids and FID log in `local`, and what the workers are handed."""

    storage: Storage
    local: Path
    worker: WorkerConfig


def _plan_run(cfg: BenchmarkConfig, paths: BenchmarkPaths, storage_path: str | None) -> _RunPlan:
    """Resolve the data, the trajectory's fingerprint and the storage (created if local)."""
    from uvit.train.checkpoint_storage import ensure_dir, resolve_storage

    tc = cfg.train
    data_dir = training_data_dir(cfg, paths).resolve()
    contexts_dir = contexts_data_dir(cfg, paths)
    contexts_dir = contexts_dir.resolve() if contexts_dir is not None else None
    fingerprint = train_fingerprint(cfg, data_dir, contexts_dir)
    where = storage_path or tc.storage_path or paths.ray_storage.resolve()
    storage = resolve_storage(where, tc.storage_endpoint).child(fingerprint)
    ensure_dir(storage)
    local = paths.ray_storage.resolve() / fingerprint
    worker = WorkerConfig(
        benchmark=cfg.model_dump(by_alias=True, mode="json", exclude={"name"}) | {"name": cfg.name},
        data_dir=str(data_dir),
        contexts_dir=str(contexts_dir) if contexts_dir is not None else None,
        tensorboard_dir=str(local / "tensorboard") if tc.tensorboard else None,
        samples_dir=str(local / "samples") if tc.sample_every else None,
        fid=_fid_inputs(cfg, paths, local) if tc.fid_every else None,
    )
    return _RunPlan(storage, local, worker)


def _fit(cfg: BenchmarkConfig, paths: BenchmarkPaths, plan: _RunPlan) -> dict[str, Any]:
    """Run `plan` on Ray Train (a new run under its storage) and export the last checkpoint."""
    import ray.train

    tc = cfg.train
    _init_ray(cfg)
    run_name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    trainer = _torch_trainer()(
        functools.partial(train_loop_per_worker, plan.worker),
        scaling_config=ray.train.ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker={"CPU": tc.threads_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=plan.storage.path,
            storage_filesystem=None if plan.storage.is_local else plan.storage.fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
        ),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"training {cfg.name} finished without a checkpoint under {plan.storage.uri}/{run_name}")
    run_dir = plan.storage.child(run_name).uri
    with result.checkpoint.as_directory() as d:
        return _export(cfg, paths, Path(d), wall=wall, run_dir=run_dir, fid_log=plan.local / "fid.csv")


def _fid_inputs(cfg: BenchmarkConfig, paths: BenchmarkPaths, local: Path) -> FIDInputs:
    """What periodic FID reads, checked before any worker starts (a missing extractor fails now)."""
    classifier = paths.classifier.resolve()
    if cfg.score.feature_extractor == "digits-classifier" and not classifier.is_dir():
        raise FileNotFoundError(
            f"{cfg.name}.train.fid_every: the FID feature extractor (the digits classifier) "
            f"is not at {classifier}; run `uvit classifier {cfg.name}` first"
        )
    if cfg.score.feature_extractor == "inception":
        from uvit.evaluate.fid import inception_weights_path

        inception_weights_path(cfg.score.inception_weights)  # raises with what to fetch
    images = (paths.data / "train").resolve()
    if not cfg.score.reference_stats and not (images / "manifest.json").is_file():
        raise FileNotFoundError(
            f"{cfg.name}.train.fid_every: no training images at {images} to compare with (or set score.reference_stats)"
        )
    local.mkdir(parents=True, exist_ok=True)
    return FIDInputs(images=str(images), classifier=str(classifier), log=str(local / "fid.csv"))


def _uri(storage, path: str) -> str:
    """A path on `storage.fs` as the user would write it (s3://... or a local path)."""
    return f"s3://{path}" if not storage.is_local else path


def _earlier_wall(earlier: dict[str, Any], ray_run: str, steps: int, rows: list[dict[str, str]]) -> float:
    """The training time of a checkpoint exported again without training: the earlier export's, when it
    was of the same run and step; else the training loop's own time from metrics.csv (each invocation's
    last elapsed_s, summed, as elapsed_s restarts when a run resumes), which leaves out Ray's start-up."""
    if earlier.get("ray_run") == ray_run and earlier.get("steps") == steps and earlier.get("wall_time_s"):
        return float(earlier["wall_time_s"])
    return loop_time([float(r["elapsed_s"]) for r in rows])


def loop_time(elapsed: list[float]) -> float:
    """Seconds of training over the invocations that logged `elapsed` (a resumed run's restarts from 0)."""
    ends = [a for a, b in zip(elapsed, elapsed[1:]) if b < a]
    return sum(ends) + (elapsed[-1] if elapsed else 0.0)


def _export(
    cfg: BenchmarkConfig, paths: BenchmarkPaths, checkpoint: Path, wall: float | None, run_dir: Path, fid_log: Path
) -> dict[str, Any]:
    """Copy a checkpoint's weights and metrics to runs/<benchmark>/train/ and write summary.json
    (and fid.csv, the periodic FID up to the checkpoint's step, with train.fid_every).
    wall: this invocation's training time; None when it trained nothing (see `_earlier_wall`)."""
    from uvit.models import UViT, count_macs

    tc = cfg.train
    out = paths.train
    earlier = read_json_or_none(out / "summary.json") or {}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copytree(checkpoint / "model", out / "model")
    shutil.copytree(checkpoint / "ema", out / "ema")
    shutil.copy2(checkpoint / "metrics.csv", out / "metrics.csv")
    steps = json.loads((checkpoint / "state.json").read_text())["step"]
    if tc.fid_every:
        export_fid_log(fid_log, out / "fid.csv", steps)
    model = UViT.from_pretrained(out / "ema")
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    losses = [float(r["loss"]) for r in rows]
    # Median logged throughput: robust to resumed runs, whose elapsed time restarts.
    speeds = sorted(float(r["images_per_s"]) for r in rows)
    steps_per_s = speeds[len(speeds) // 2] / tc.batch_size if speeds else None
    tail = losses[-max(1, len(losses) // 10) :]
    if wall is None:
        wall = _earlier_wall(earlier, _relative(run_dir, paths.root), steps, rows)
    summary = {
        "benchmark": cfg.name,
        "preset": cfg.model.preset,
        "title": _preset_title(cfg.model.preset),
        "params": model.num_parameters(),
        "gmacs": count_macs(model.config) / 1e9,
        "steps": steps,
        "batch_size": tc.batch_size,
        "images_seen": steps * tc.batch_size,
        "wall_time_s": round(wall, 2),
        "steps_per_s": round(steps_per_s, 3) if steps_per_s else None,
        "final_loss": sum(tail) / len(tail),
        "num_workers": tc.num_workers,
        "precision": tc.precision,
        "hardware": hardware_description(cfg, checkpoint),
        "ray_run": _relative(run_dir, paths.root),
    }
    if (data := _data_facts(paths.data / "train")) is not None:
        summary["data"] = data
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def export_fid_log(log: Path, dest: Path, steps: int) -> None:
    """The periodic FID log ("step,fid" lines appended by rank 0, repeated after a resume) as a CSV
    with a header: one row per step up to `steps`, the latest value of each."""
    values: dict[int, float] = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            step, _, value = line.partition(",")
            if value and int(step) <= steps:
                values[int(step)] = float(value)
    dest.write_text("step,fid\n" + "".join(f"{s},{values[s]!r}\n" for s in sorted(values)))


def _data_facts(split: Path) -> dict | None:
    """The training split as the report names it: source, rows and class names (when known)."""
    from uvit.data.shards import DataIntegrityError, Manifest

    try:
        m = Manifest.load(split)
    except DataIntegrityError:
        return None
    return {"source": m.meta.get("source"), "rows": m.count, "classes": list(m.meta.get("classes") or [])}


def _relative(path: str | Path, root: Path) -> str:
    """`path` relative to the project root when it lies inside it (artifacts should not name machines)."""
    if str(path).startswith("s3://"):
        return str(path)
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def _preset_title(preset: str) -> str:
    from uvit.models import get_preset

    return get_preset(preset).title
