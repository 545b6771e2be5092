"""U-ViT as a diffusers pipeline: `UViTTransformer` (a diffusers model that IS a `UViT`) and
`UViTPipeline` (transformer + scheduler + optional VAE + optional CLIP text encoder). The scheduler is
the project's `UViTDPMSolverScheduler` (every sampler of uvit.diffusion) or, for the discrete
(scaled-linear) models, any stock diffusers scheduler, run by diffusers' step loop.

    pipe = UViTPipeline(transformer=UViTTransformer.from_uvit(model),
                        scheduler=UViTDPMSolverScheduler.official("vpsde"))
    pipe.save_pretrained(d); pipe = UViTPipeline.from_pretrained(d)       # offline, local dir
    images = pipe(class_labels=[1, 2, 3], guidance_scale=0.4, num_inference_steps=50).images

Sample i depends only on seeds[i] and its condition, exactly as in `uvit.evaluate.sample.generate`
(same per-sample noise, same guidance, same sampler code), so both give identical tensors.

Weights layout: `UViTTransformer` subclasses `UViT`, so its state dict has EXACTLY UViT's keys (no
`net.` prefix): the official `nnet_ema.pth` keys, a project `model.safetensors` and the diffusers
`diffusion_pytorch_model.safetensors` all load into either class strictly. The one seam is
`config`: diffusers needs `self.config` to be its FrozenDict, `UViT.forward` reads UViTConfig
fields and derived properties from it; `UViTConfigDict` is a FrozenDict that provides both.

Load a saved pipeline with `UViTPipeline.from_pretrained(dir)` (not `DiffusionPipeline.from_pretrained`:
`model_index.json` names the components' module, `uvit.evaluate.diffusers_pipeline`, which diffusers only
resolves once it has been imported; importing this module does that).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, ConfigMixin, DiffusionPipeline, ImagePipelineOutput, ModelMixin, SchedulerMixin
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.configuration_utils import FrozenDict, register_to_config
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from uvit.diffusion import DiscreteSchedule, PerSampleNoise, wrap_model
from uvit.diffusion.guidance import Condition, guided_network
from uvit.evaluate.sample import sample_seeds, to_uint8
from uvit.evaluate.scheduler import SCHEDULES, STEP_SOLVERS, UViTDPMSolverScheduler
from uvit.models import UViT, UViTConfig
from uvit.signatures import takes_fields

__all__ = ["UViTConfigDict", "UViTTransformer", "UViTPipeline", "PipelineCall", "OUTPUT_TYPES"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_FIELDS = tuple(f.name for f in dataclasses.fields(UViTConfig))


class UViTConfigDict(FrozenDict):
    """diffusers' frozen config dict that also answers as a `UViTConfig`.

    Keys and item access are diffusers' (`_class_name`, `_diffusers_version`, ... included); the
    UViTConfig fields are attributes already (FrozenDict sets one per key), and the derived
    properties UViT.forward needs (`extras`, `num_tokens`, `num_patches`) come from `to_uvit_config()`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "_uvit", UViTConfig.from_dict({k: self[k] for k in _FIELDS if k in self}))

    def to_uvit_config(self) -> UViTConfig:
        return self._uvit

    @property
    def num_patches(self) -> int:
        return self._uvit.num_patches

    @property
    def extras(self) -> int:
        return self._uvit.extras

    @property
    def num_tokens(self) -> int:
        return self._uvit.num_tokens


class UViTTransformer(ModelMixin, UViT, ConfigMixin):
    """A `UViT` that diffusers can save, load and put in a pipeline.

    Its registered config is UViTConfig's fields; its modules, forward and state dict are UViT's
    (no prefix). Saves as `config.json` + `diffusion_pytorch_model.safetensors`.
    forward(x, t, y=None, context=None) -> eps (a tensor, UViT's contract, not a diffusers output).

    Base order matters: the MRO is ModelMixin, UViT, nn.Module, ..., ConfigMixin, so diffusers'
    save/load win over UViT's and ModelMixin.__getattr__ falls through to nn.Module's (parameters,
    submodules) as in any diffusers model, not to ConfigMixin's.
    """

    config_name = "config.json"

    @register_to_config
    @takes_fields(UViTConfig)  # the registered config keys are UViTConfig's fields, declared there once
    def __init__(self, cfg: UViTConfig):
        # In this MRO UViT.__init__'s super().__init__() is nn.Module.__init__, while ModelMixin.__init__
        # would reach UViT.__init__ with no config: so call UViT's and set ModelMixin's one attribute.
        UViT.__init__(self, cfg)
        self._gradient_checkpointing_func = None

    # diffusers reads `config` as its FrozenDict, UViT as a UViTConfig: serve one object that is both.
    @property
    def config(self) -> UViTConfigDict:
        src = self.__dict__["_internal_dict"]
        cached = self.__dict__.get("_config_view")
        if cached is None or cached[0] is not src:
            cached = (src, UViTConfigDict(src))
            self.__dict__["_config_view"] = cached
        return cached[1]

    @config.setter
    def config(self, value: UViTConfig) -> None:
        # UViT.__init__ assigns the UViTConfig it was built from; it must be the registered one.
        if value != self.config.to_uvit_config():
            raise AttributeError("UViTTransformer.config is the registered diffusers config; it cannot be replaced")

    def to_uvit_config(self) -> UViTConfig:
        return self.config.to_uvit_config()

    @classmethod
    def from_uvit(cls, model: UViT) -> UViTTransformer:
        """The same network (a copy of its weights) as a diffusers model."""
        cfg = model.config.to_uvit_config() if isinstance(model, UViTTransformer) else model.config
        out = cls(**cfg.to_dict())
        out.load_state_dict(model.state_dict(), strict=True)
        p = next(model.parameters(), None)
        if p is None:
            return out
        out = out.to(p.device)  # (a dtype argument makes ModelMixin.to warn about fp32 modules)
        return out if p.dtype == torch.float32 else out.to(p.dtype)

    def to_uvit(self) -> UViT:
        """A plain `UViT` with the same weights (e.g. for `UViT.save_pretrained`)."""
        out = UViT(self.to_uvit_config())
        out.load_state_dict(self.state_dict(), strict=True)
        return out.to(device=self.device, dtype=self.dtype)


def _as_list(v, name: str) -> list:
    if v is None:
        return []
    if isinstance(v, (str, int, np.integer)):
        return [v]
    if isinstance(v, Tensor):
        return v.reshape(-1).tolist()
    if isinstance(v, np.ndarray):
        return v.reshape(-1).tolist()
    if isinstance(v, Sequence):
        return list(v)
    raise TypeError(f"{name} must be a value, a sequence or a tensor, got {type(v).__name__}")


@dataclass(frozen=True, eq=False)
class PipelineCall:
    """The arguments of `UViTPipeline.__call__` (diffusers' names), declared once.

    class_labels: class indices (class-conditional models). prompt: strings (text models).
    num_images: repeats a single label/prompt, or sets the count of an unconditional model.
    guidance_scale: s of eps = (1 + s) eps_c - s eps_u (0: no guidance, a single forward). This
        is U-ViT's s, not diffusers' w = 1 + s.
    num_inference_steps: the scheduler's steps.
    seeds: one integer per image; sample i depends only on seeds[i] and its condition.
        Default `sample_seeds(0, n)` (as `generate`), or, with `generator`, n seeds drawn from it
        (a list of n generators: seed i from generator i).
    output_type: "pil" (list of PIL images), "np" (N, H, W, C float in [0, 1]), "pt"
        (N, C, H, W float in [0, 1]) or "latent" (the sampler's output, before any VAE decode).
    batch_size: images per sampler call (the CFG forward then has 2x this batch).
    return_dict: an ImagePipelineOutput, else the tuple (images,).
    num_images_per_prompt: images per label / prompt, consecutive (diffusers' order: a, a, b, b);
        an unconditional model makes num_images * num_images_per_prompt.
    latents: x_T, (n, C, H, W) standard normal, used instead of the seeds' draws (scaled by the
        scheduler's init_noise_sigma, as in diffusers); seeds still drive any sampler noise.
    callback_on_step_end: callback(pipe, step, timestep, {"latents": x}) -> dict after every
        scheduler step (per batch of `batch_size`); returned "latents" replace x, and setting
        `pipe._interrupt = True` stops the loop. Needs a step loop: a stock scheduler, or a
        UViTDPMSolverScheduler with solver dpm_solver_pp_2m / 3m.
    callback_on_step_end_tensor_inputs: keys to hand the callback, from `_callback_tensor_inputs`.
    """

    class_labels: int | Sequence[int] | Tensor | None = None
    prompt: str | Sequence[str] | None = None
    num_images: int | None = None
    guidance_scale: float = 0.0
    num_inference_steps: int = 50
    seeds: Sequence[int] | None = None
    generator: torch.Generator | list[torch.Generator] | None = None
    output_type: str = "pil"
    batch_size: int = 500
    return_dict: bool = True
    num_images_per_prompt: int = 1
    latents: Tensor | None = None
    callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None
    callback_on_step_end_tensor_inputs: list[str] | None = None


class UViTPipeline(DiffusionPipeline):
    """Class-conditional, text-to-image or unconditional U-ViT sampling, pixel or latent space.

    Components: `transformer` (UViTTransformer), `scheduler` (a UViTDPMSolverScheduler, or on the
    discrete schedule any stock diffusers scheduler: see `check_scheduler`), optional
    `vae` (AutoencoderKL: the transformer then works on latents, decoded as
    vae.decode(z / vae.config.scaling_factor); set `scaling_factor` in the VAE config, e.g. 0.2301
    for the COCO model), optional `text_encoder` + `tokenizer` (CLIP: the context is
    last_hidden_state of the prompt padded to `transformer.config.num_text_tokens`, as the official
    FrozenCLIPEmbedder does; the unconditional context for CFG is the encoding of "").

    `schedule` ("vpsde" or "discrete", default: the scheduler's) is the model's training schedule,
    saved in model_index.json; it decides which schedulers may drive the model:

        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # discrete only
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: UViTTransformer,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | None = None,
        text_encoder: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        schedule: str | None = None,
    ):
        super().__init__()
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("text_encoder and tokenizer come together (both or neither)")
        if schedule is None:
            if not isinstance(scheduler, UViTDPMSolverScheduler):
                raise ValueError(
                    f"pass schedule='discrete' or 'vpsde' (the model's training schedule) with a "
                    f"{type(scheduler).__name__}: a stock scheduler cannot say which the model uses"
                )
            schedule = scheduler.config.schedule
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}: valid choices are {SCHEDULES}")
        self.register_modules(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer
        )
        self.register_to_config(schedule=schedule)  # the model's, kept in model_index.json across swaps
        self._guidance_scale, self._num_timesteps, self._interrupt = 0.0, 0, False

    # ------------------------------------------------------------------ conditions
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device: torch.device | str | None = None) -> Tensor:
        """(len(prompts), num_text_tokens, hidden) CLIP last_hidden_state, in float32."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this pipeline has no text_encoder/tokenizer: it cannot encode prompts")
        device = device or self._execution_device
        length = self.transformer.config.num_text_tokens
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.text_encoder(ids.to(device)).last_hidden_state.float()

    def _conditions(self, class_labels, prompt, num_images: int | None, per_prompt: int = 1):
        """(n, condition kind, per-sample labels tensor or prompts list or None); each label /
        prompt is repeated `per_prompt` times in a row."""
        c = self.transformer.config
        if c.clip_dim is not None:
            if class_labels is not None:
                raise ValueError("a text-conditional model takes `prompt`, not `class_labels`")
            prompts = _as_list(prompt, "prompt")
            if not prompts:
                raise ValueError("a text-conditional model needs `prompt` (a string or a list of strings)")
            if num_images is not None and len(prompts) == 1:
                prompts = prompts * num_images
            prompts = [p for p in prompts for _ in range(per_prompt)]
            return len(prompts), "text", prompts
        if prompt is not None:
            raise ValueError("this model is not text-conditional: `prompt` is not accepted")
        if c.num_classes > 0:
            labels = _as_list(class_labels, "class_labels")
            if not labels:
                raise ValueError(
                    f"a class-conditional model needs `class_labels` (0..{c.num_classes - 1}; the "
                    f"last, {c.num_classes - 1}, is the null class of CFG training)"
                )
            if num_images is not None and len(labels) == 1:
                labels = labels * num_images
            labels = [v for v in labels for _ in range(per_prompt)]
            y = torch.tensor([int(v) for v in labels], dtype=torch.long)
            if y.min() < 0 or y.max() >= c.num_classes:
                raise ValueError(f"class_labels must lie in [0, {c.num_classes}), got {y.tolist()}")
            return len(labels), "class", y
        if class_labels is not None:
            raise ValueError("this model is unconditional: `class_labels` is not accepted")
        return (1 if num_images is None else num_images) * per_prompt, "none", None

    def _network(self, condition: Condition, guidance_scale: float):
        """net(x, model_time) -> eps for one batch, guided as `generate` does (`guided_network`)."""
        model = self.transformer
        dtype = model.dtype
        if dtype != torch.float32:  # samplers keep x in float32; run the network in its own dtype

            def model(x, t, _m=model, **kw):  # noqa: E306
                kw = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in kw.items()}
                return _m(x.to(dtype), t, **kw).float()

        c = self.transformer.config
        return guided_network(model, guidance_scale, condition, c.num_classes - 1 if c.num_classes > 0 else None)

    # ------------------------------------------------------------------ output
    @torch.no_grad()
    def decode_latents(self, z: Tensor, batch_size: int = 50) -> Tensor:
        """Latents (N, C, h, w) -> pixels (N, 3, H, W) in [-1, 1] (chunks of 50, as the official scripts)."""
        vae = self.vae
        scale = vae.config.scaling_factor
        out = []
        for i in range(0, z.shape[0], batch_size):
            zi = (z[i : i + batch_size] / scale).to(device=vae.device, dtype=vae.dtype)
            out.append(vae.decode(zi).sample.float())
        return torch.cat(out)

    @staticmethod
    def _to_output(x: Tensor, output_type: str):
        """[-1, 1] (N, C, H, W) -> pt: [0, 1] NCHW float; np: [0, 1] NHWC float; pil: PIL list."""
        if output_type == "pt":
            return ((x + 1) / 2).clamp(0, 1)
        if output_type == "np":
            return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        from PIL import Image

        u8 = to_uint8(x.cpu()).transpose(0, 2, 3, 1)  # the project's uint8 rounding (sample files)
        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in u8]

    # ------------------------------------------------------------------ schedulers
    def check_scheduler(self) -> bool:
        """Check that `self.scheduler` fits the model's schedule; True for a stock diffusers scheduler
        (run by the step loop), False for a `UViTDPMSolverScheduler`. Raises ValueError/TypeError."""
        sched, schedule = self.scheduler, self.config.schedule
        if isinstance(sched, UViTDPMSolverScheduler):
            if sched.config.schedule != schedule:
                raise ValueError(
                    f"the scheduler's schedule {sched.config.schedule!r} is not the model's "
                    f"{schedule!r} (pipeline.config.schedule): the network was trained on one schedule"
                )
            return False
        name = type(sched).__name__
        if schedule != "discrete":
            raise ValueError(
                f"{name} is a discrete-time diffusers scheduler, but this model was trained on the continuous "
                f"VP SDE (schedule {schedule!r}: alpha(t) continuous in t in [0, 1], network time 999 t), which "
                "no stock scheduler's betas and integer timesteps describe; use "
                "UViTDPMSolverScheduler(schedule='vpsde', solver=...) (any sampler of uvit.diffusion)"
            )
        for attr in ("set_timesteps", "step"):
            if not callable(getattr(sched, attr, None)):
                raise TypeError(f"{name} has no {attr}(): not a diffusers scheduler with the standard step API")
        pred = getattr(sched.config, "prediction_type", "epsilon")
        if pred != "epsilon":
            raise ValueError(f"{name} has prediction_type={pred!r}, but U-ViT predicts the noise: use 'epsilon'")
        ac = getattr(sched, "alphas_cumprod", None)
        if ac is None:
            raise ValueError(
                f"{name} has no alphas_cumprod, so its schedule cannot be checked against the "
                "model's discrete scaled-linear one"
            )
        want = DiscreteSchedule().alphas_cumprod
        got = torch.as_tensor(ac).detach().cpu().double()
        # diffusers computes its betas in float32: a relative 1e-4 is far above that, far below any other schedule
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=0):
            raise ValueError(
                f"{name}'s betas are not the model's (scaled_linear, beta_start=0.00085, beta_end=0.012, "
                f"1000 steps): build it with {name}.from_config(pipe.scheduler.config) from a "
                "UViTDPMSolverScheduler(schedule='discrete'), or pass those beta keys"
            )
        return True

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` in a step-end callback to stop the loop (diffusers' rule)."""
        return self._interrupt

    def _step_loop(
        self,
        net,
        x: Tensor,
        num_inference_steps: int,
        noise: PerSampleNoise,
        stock: bool,
        callback,
        callback_inputs: list[str],
    ) -> Tensor:
        """diffusers' denoising loop over scheduler.timesteps for one batch of x_T (B, C, H, W)."""
        sched = self.scheduler
        sched.set_timesteps(num_inference_steps, device=x.device)  # also resets multistep history
        timesteps = sched.timesteps
        self._num_timesteps = len(timesteps)
        x = x * sched.init_noise_sigma
        # stochastic schedulers (DDPM, DDIM eta > 0, SDE-DPM-Solver) draw one row per sample's generator
        extra = {"generator": noise.generators} if "generator" in inspect.signature(sched.step).parameters else {}
        # diffusers' timestep k has alpha-bar of k + 1 betas, which is the U-ViT network's time n = k + 1;
        # the project's scheduler lists network times already
        offset = 1.0 if stock else 0.0
        for i, t in enumerate(timesteps):
            if self.interrupt:
                break
            t_net = torch.full((x.shape[0],), float(t) + offset, dtype=torch.float32, device=x.device)
            inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x  # (diffusers' rule)
            eps = net(inp, t_net)
            x = sched.step(eps, t, x, **extra, return_dict=False)[0]
            if callback is not None:
                out = callback(self, i, t, {k: {"latents": x}[k] for k in callback_inputs})
                x = out.pop("latents", x)
        return x

    # ------------------------------------------------------------------ sampling
    def _check_call(self, call: PipelineCall) -> tuple[bool, bool, list[str]]:
        """(stock scheduler, run the step loop, the callback's tensor inputs), or a ValueError."""
        if call.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={call.output_type!r}: valid choices are {OUTPUT_TYPES}")
        if call.num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {call.num_images_per_prompt}")
        callback, cb_inputs = call.callback_on_step_end, call.callback_on_step_end_tensor_inputs
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            cb_inputs = callback.tensor_inputs
        cb_inputs = list(cb_inputs or ["latents"])
        bad = [k for k in cb_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs has to be in {self._callback_tensor_inputs}, but found {bad}"
            )
        stock = self.check_scheduler()
        use_steps = stock or callback is not None
        if use_steps and not stock and not self.scheduler.has_step_loop:
            raise ValueError(
                f"callback_on_step_end needs a step loop; solver {self.scheduler.config.solver!r} runs its "
                f"whole trajectory in sample(): use {STEP_SOLVERS} or a stock diffusers scheduler"
            )
        return stock, use_steps, cb_inputs

    @staticmethod
    def _seeds(call: PipelineCall, n: int) -> list[int]:
        """One seed per image: `seeds`, or drawn from `generator` (one per generator of a list),
        else sample_seeds(0, n)."""
        seeds, generator = call.seeds, call.generator
        if seeds is None:
            if isinstance(generator, list):
                if len(generator) != n:
                    raise ValueError(f"{len(generator)} generators for {n} images")
                seeds = [int(torch.randint(0, 2**62, (1,), generator=g)) for g in generator]
            elif generator is not None:
                seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()
            else:
                seeds = sample_seeds(0, n)
        elif generator is not None:
            raise ValueError("pass `seeds` or `generator`, not both")
        seeds = [int(s) for s in seeds]
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} images")
        return seeds

    def _batch_condition(self, kind: str, cond, rows: slice, empty: Tensor | None, device) -> Condition:
        """The condition of images `rows` on `device` (prompts are encoded here, batch by batch)."""
        if kind == "class":
            return Condition(labels=cond[rows]).to(device)
        if kind == "text":
            return Condition(contexts=self.encode_prompt(cond[rows], device), empty_context=empty)
        return Condition()

    def _sample_batch(self, call: PipelineCall, x_T: Tensor, net, noise: PerSampleNoise, stock, use_steps, cb_inputs):
        """x_0 (B, C, H, W) float32 from x_T by the scheduler: its step loop, or its sampler's whole trajectory."""
        sched = self.scheduler
        if use_steps:
            return self._step_loop(
                net, x_T, call.num_inference_steps, noise, stock, call.callback_on_step_end, cb_inputs
            )
        return sched.sample(
            wrap_model(net, sched.noise_schedule), x_T * sched.init_noise_sigma, call.num_inference_steps, noise=noise
        )

    @torch.no_grad()
    @takes_fields(PipelineCall)
    def __call__(self, call: PipelineCall) -> ImagePipelineOutput | tuple:
        """Generate one image per class label / prompt (or `num_images` unconditional ones); the
        arguments are `PipelineCall`'s fields (diffusers' keyword names).

        The scheduler is a `UViTDPMSolverScheduler` (its sampler runs the whole trajectory, exactly
        as `generate`) or, on the discrete schedule, any diffusers scheduler with the standard
        set_timesteps / scale_model_input / step API, run by diffusers' step loop.
        """
        stock, use_steps, cb_inputs = self._check_call(call)
        n, kind, cond = self._conditions(call.class_labels, call.prompt, call.num_images, call.num_images_per_prompt)
        seeds = self._seeds(call, n)
        device = self._execution_device
        c = self.transformer.config
        shape = (c.in_chans, c.img_size, c.img_size)
        latents = call.latents
        if latents is not None and tuple(latents.shape) != (n, *shape):
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {(n, *shape)}")
        self.transformer.eval()
        self._guidance_scale, self._interrupt = call.guidance_scale, False
        self.scheduler.set_timesteps(call.num_inference_steps)  # for inspection (scheduler.timesteps)
        self._num_timesteps = len(self.scheduler.timesteps)
        empty = self.encode_prompt([""], device) if kind == "text" and call.guidance_scale > 0 else None

        out = []
        with self.progress_bar(total=n) as bar:
            for start in range(0, n, call.batch_size):
                chunk = seeds[start : start + call.batch_size]
                rows = slice(start, start + len(chunk))
                noise = PerSampleNoise(chunk, device=device)
                x_T = noise.randn(shape)
                if latents is not None:  # (drawing x_T anyway keeps the generators where the seeds put them)
                    x_T = latents[rows].to(device=device, dtype=torch.float32)
                net = self._network(self._batch_condition(kind, cond, rows, empty, device), call.guidance_scale)
                out.append(self._sample_batch(call, x_T, net, noise, stock, use_steps, cb_inputs).float())
                bar.update(len(chunk))
        return self._finish(torch.cat(out), call.output_type, call.return_dict)

    def _finish(self, x: Tensor, output_type: str, return_dict: bool) -> ImagePipelineOutput | tuple:
        """The sampler's output x (N, C, H, W) as `output_type` (decoded by the VAE unless "latent")."""
        if output_type == "latent":
            images = x
        else:
            if self.vae is not None:
                x = self.decode_latents(x)
            images = self._to_output(x, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
