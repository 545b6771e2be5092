"""uvit.evaluate.diffusers_pipeline / scheduler: U-ViT as a diffusers pipeline, offline, with tiny models.

The pipeline must reproduce `uvit.evaluate.sample.generate` exactly (same seeds, labels, sampler,
steps, guidance), survive save_pretrained/from_pretrained, swap schedulers, decode latents with an
AutoencoderKL and condition on a CLIP text encoder (with the empty prompt as CFG's unconditional).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from uvit.diffusion import PerSampleNoise, count_nfe, make_schedule, sample, wrap_model
from uvit.evaluate.diffusers_pipeline import UViTPipeline, UViTTransformer
from uvit.evaluate.sample import Condition, SamplingRecipe, generate, sample_seeds, to_uint8
from uvit.evaluate.scheduler import UViTDPMSolverScheduler
from uvit.models import UViT, UViTConfig

TINY = dict(img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2)
STEPS = 6


def _uvit(**kw) -> UViT:
    torch.manual_seed(0)
    return UViT(UViTConfig(**{**TINY, **kw})).eval()


def _quiet(pipe: UViTPipeline) -> UViTPipeline:
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def class_model() -> UViT:
    return _uvit(num_classes=5)  # 4 real classes + the null class 4


@pytest.fixture(scope="module")
def saved_class_pipe(class_model, tmp_path_factory) -> Path:
    pipe = UViTPipeline(
        transformer=UViTTransformer.from_uvit(class_model),
        scheduler=UViTDPMSolverScheduler(schedule="vpsde", solver="dpm_solver"),
    )
    d = tmp_path_factory.mktemp("class_pipe")
    pipe.save_pretrained(d)
    return d


# ---------------------------------------------------------------------------- transformer
def test_transformer_is_a_uvit_with_the_same_state_dict(class_model, saved_class_pipe):
    import dataclasses
    import inspect

    params = list(inspect.signature(UViTTransformer.__init__).parameters)[1:]
    assert params == [f.name for f in dataclasses.fields(UViTConfig)]  # the registered config IS UViTConfig
    tr = UViTTransformer.from_uvit(class_model)
    assert isinstance(tr, UViT)
    assert tr.config.num_classes == 5 and tr.config.extras == class_model.config.extras
    assert tr.to_uvit_config() == class_model.config
    assert list(tr.state_dict()) == list(class_model.state_dict())  # no prefix
    # The diffusers weight file loads into a plain UViT strictly, and back.
    sd = load_file(str(saved_class_pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    plain = UViT(class_model.config)
    plain.load_state_dict(sd, strict=True)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(tr(x, t, y=y), class_model(x, t, y=y))
        assert torch.equal(plain(x, t, y=y), class_model(x, t, y=y))
        assert torch.equal(tr.to_uvit()(x, t, y=y), class_model(x, t, y=y))
    cfg = json.loads((saved_class_pipe / "transformer" / "config.json").read_text())
    assert cfg["_class_name"] == "UViTTransformer" and cfg["embed_dim"] == 32


# ---------------------------------------------------------------------------- equality with generate
@pytest.mark.parametrize("scale", [0.0, 0.7])
def test_roundtrip_pipeline_equals_generate(class_model, saved_class_pipe, scale):
    pipe = _quiet(UViTPipeline.from_pretrained(saved_class_pipe))
    assert isinstance(pipe.transformer, UViTTransformer)
    assert isinstance(pipe.scheduler, UViTDPMSolverScheduler) and pipe.vae is None
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    got = pipe(
        class_labels=labels, guidance_scale=scale, num_inference_steps=STEPS, output_type="latent", batch_size=4
    ).images
    want = generate(
        class_model,
        SamplingRecipe("vpsde", "dpm_solver", STEPS, scale),
        sample_seeds(0, 7),
        Condition(labels),
        batch_size=4,
        progress=False,
    )
    assert torch.equal(got, want)
    # explicit seeds, a different batch split (pipeline: [2, 1]; reference: one sample per call):
    # sample i depends only on seeds[i] and its label
    seeds, classes = [11, 5, 42], [2, 2, 0]
    got = pipe(
        class_labels=classes,
        seeds=seeds,
        guidance_scale=scale,
        num_inference_steps=STEPS,
        output_type="latent",
        batch_size=2,
    ).images
    want = torch.cat(
        [
            generate(
                class_model,
                SamplingRecipe("vpsde", "dpm_solver", STEPS, scale),
                [s],
                Condition(torch.tensor([c])),
                batch_size=1,
                progress=False,
            )
            for s, c in zip(seeds, classes, strict=True)
        ]
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_scheduler_swap_changes_result_and_matches_generate(class_model, saved_class_pipe):
    pipe = _quiet(UViTPipeline.from_pretrained(saved_class_pipe))
    kw = dict(class_labels=[1, 3], guidance_scale=0.4, num_inference_steps=STEPS, output_type="latent")
    base = pipe(**kw).images
    pipe.scheduler = UViTDPMSolverScheduler.from_config(pipe.scheduler.config, solver="dpm_solver_pp_2m")
    two_m = pipe(**kw).images
    assert not torch.allclose(base, two_m, atol=1e-3)
    want = generate(
        class_model,
        SamplingRecipe("vpsde", "dpm_solver_pp_2m", STEPS, 0.4),
        sample_seeds(0, 2),
        Condition(torch.tensor([1, 3])),
        progress=False,
    )
    assert torch.equal(two_m, want)
    # the swapped scheduler is what a re-saved pipeline carries
    pipe.scheduler.save_pretrained(saved_class_pipe.parent / "sched")
    back = UViTDPMSolverScheduler.from_pretrained(saved_class_pipe.parent / "sched")
    assert back.config.solver == "dpm_solver_pp_2m" and back.config.schedule == "vpsde"


def test_generator_and_seed_arguments(saved_class_pipe):
    pipe = _quiet(UViTPipeline.from_pretrained(saved_class_pipe))
    kw = dict(class_labels=2, num_images=3, num_inference_steps=2, output_type="latent")
    a = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    b = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    assert a.shape == (3, 3, 8, 8) and torch.equal(a, b)
    assert not torch.equal(a, pipe(**kw).images)  # default seeds differ from drawn ones
    with pytest.raises(ValueError, match="seeds"):
        pipe(seeds=[1, 2], **kw)
    with pytest.raises(ValueError, match="class_labels"):
        pipe(num_inference_steps=2)
    with pytest.raises(ValueError, match="prompt"):
        pipe(class_labels=[0], prompt="a cat", num_inference_steps=2)
    with pytest.raises(ValueError, match="class_labels must lie"):
        pipe(class_labels=[5], num_inference_steps=2)


def test_output_types(saved_class_pipe):
    pipe = _quiet(UViTPipeline.from_pretrained(saved_class_pipe))
    kw = dict(class_labels=[0, 1, 2], num_inference_steps=3)
    lat = pipe(output_type="latent", **kw).images
    arr = pipe(output_type="np", **kw).images
    assert isinstance(arr, np.ndarray) and arr.shape == (3, 8, 8, 3) and arr.dtype == np.float32
    assert arr.min() >= 0.0 and arr.max() <= 1.0
    u8 = (arr * 255).round().astype(np.uint8)
    assert np.abs(u8.astype(int) - to_uint8(lat).transpose(0, 2, 3, 1)).max() <= 1
    pt = pipe(output_type="pt", **kw).images
    assert pt.shape == (3, 3, 8, 8) and torch.allclose(pt.permute(0, 2, 3, 1), torch.from_numpy(arr))
    pil = pipe(**kw).images
    assert len(pil) == 3 and pil[0].size == (8, 8) and pil[0].mode == "RGB"
    assert np.array_equal(np.asarray(pil[1]), to_uint8(lat)[1].transpose(1, 2, 0))
    with pytest.raises(ValueError, match="output_type"):
        pipe(output_type="jpeg", **kw)


# ---------------------------------------------------------------------------- scheduler
@pytest.mark.parametrize(
    "solver,schedule",
    [
        ("dpm_solver", "vpsde"),
        ("dpm_solver_pp", "discrete"),
        ("dpm_solver_pp_2m", "discrete"),
        ("euler_maruyama", "vpsde"),
        ("dpm_solver_pp_3m", "discrete"),
        ("unipc_bh2", "discrete"),
    ],
)
def test_scheduler_timesteps_are_the_network_inputs(class_model, solver, schedule):
    sch = UViTDPMSolverScheduler(schedule=schedule, solver=solver)
    pipe = _quiet(UViTPipeline(transformer=UViTTransformer.from_uvit(class_model), scheduler=sch))
    seen: list[float] = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, args: seen.append(float(args[1].reshape(-1)[0])))
    try:
        pipe(class_labels=[0], num_inference_steps=5, output_type="latent")
    finally:
        hook.remove()
    assert len(sch.timesteps) == len(seen) == count_nfe(solver, 5) == sch.num_model_evaluations(5)
    assert torch.equal(sch.timesteps, torch.tensor(seen, dtype=torch.float32))
    assert seen[0] == pytest.approx(999.0 if schedule == "vpsde" else 1000.0)


def test_scheduler_config_and_validation(tmp_path):
    sch = UViTDPMSolverScheduler.official("discrete")
    assert (sch.config.solver, sch.config.order) == ("dpm_solver_pp", 3)
    sch.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert cfg["_class_name"] == "UViTDPMSolverScheduler"
    assert {"schedule", "solver", "order", "skip_type", "t_end"} <= set(cfg)
    back = UViTDPMSolverScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(sch.config)
    fast = UViTDPMSolverScheduler(solver="dpm_solver", order=3, skip_type="time_uniform", t_end=1e-3)
    assert fast.sampler_kwargs == {"order": 3, "skip_type": "time_uniform", "t_end": 1e-3, "denoise_final": False}
    assert UViTDPMSolverScheduler(solver="euler_maruyama").sampler_kwargs == {"denoise_final": False}
    assert UViTDPMSolverScheduler(solver="dpm_solver").sampler_kwargs == {"denoise_final": False}  # order: default
    for bad in (
        dict(solver="ddim"),
        dict(schedule="cosine"),
        dict(order=4),
        dict(skip_type="karras"),
        dict(solver="euler_maruyama", schedule="discrete"),
        dict(prediction_type="v_prediction"),
        dict(schedule="discrete", beta_schedule="linear"),
        dict(schedule="discrete", beta_end=0.02),
    ):
        with pytest.raises(ValueError):
            UViTDPMSolverScheduler(**bad)
    with pytest.raises(NotImplementedError, match="sample"):
        sch.set_timesteps(3)
        sch.step(torch.zeros(1, 1), sch.timesteps[0], torch.zeros(1, 1))


@pytest.mark.parametrize("steps", [6, 12])  # < 10: first-order final step (lower_order_final)
def test_2m_step_loop_equals_sample(class_model, steps):
    sch = UViTDPMSolverScheduler(schedule="discrete", solver="dpm_solver_pp_2m")
    y = torch.tensor([0, 3])
    x_T = PerSampleNoise([3, 4]).randn((3, 8, 8))
    with torch.no_grad():
        want = sch.sample(wrap_model(lambda x, t: class_model(x, t, y=y), sch.noise_schedule), x_T, steps)
        sch.set_timesteps(steps)
        x = x_T
        for t in sch.timesteps:
            x = sch.step(class_model(sch.scale_model_input(x, t), t, y=y), t, x).prev_sample
    assert torch.equal(x, want)
    ref = sample(
        "dpm_solver_pp_2m",
        wrap_model(lambda x, t: class_model(x, t, y=y), make_schedule("discrete")),
        make_schedule("discrete"),
        x_T,
        steps,
    )
    assert torch.equal(want, ref)


# ---------------------------------------------------------------------------- latent (VAE)
def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=8,
        scaling_factor=0.5,
    ).eval()


def test_latent_pipeline_decodes_with_the_vae(tmp_path):
    model = _uvit(img_size=4, in_chans=4, num_classes=3)
    vae = _tiny_vae()
    pipe = _quiet(
        UViTPipeline(
            transformer=UViTTransformer.from_uvit(model), scheduler=UViTDPMSolverScheduler.official("discrete"), vae=vae
        )
    )
    kw = dict(class_labels=[0, 1, 0], guidance_scale=0.5, num_inference_steps=3)
    z = pipe(output_type="latent", **kw).images
    assert z.shape == (3, 4, 4, 4)
    want_z = generate(
        model,
        SamplingRecipe("discrete", "dpm_solver_pp", 3, 0.5),
        sample_seeds(0, 3),
        Condition(torch.tensor([0, 1, 0])),
        progress=False,
    )
    assert torch.equal(z, want_z)
    pt = pipe(output_type="pt", **kw).images
    assert pt.shape == (3, 3, 8, 8)  # the VAE's output size, not the latent's
    with torch.no_grad():
        want = ((vae.decode(z / 0.5).sample + 1) / 2).clamp(0, 1)
    assert torch.allclose(pt, want, atol=1e-6)

    pipe.save_pretrained(tmp_path)
    back = _quiet(UViTPipeline.from_pretrained(tmp_path))
    assert back.vae is not None and back.vae.config.scaling_factor == 0.5
    assert torch.equal(back(output_type="pt", **kw).images, pt)


# ---------------------------------------------------------------------------- text (CLIP)
def _tiny_clip(tmp_path: Path, max_len: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tmp_path.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters] + ["ca", "cat</w>"]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    torch.manual_seed(2)
    cfg = CLIPTextConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_len,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(cfg).eval(), tok


def test_text_pipeline_with_guidance_roundtrips(tmp_path):
    enc, tok = _tiny_clip(tmp_path / "tok")
    ids = tok(["a cat"], padding="max_length", max_length=16, truncation=True).input_ids[0]
    assert len(ids) == 16 and ids[0] == 0 and 55 in ids  # bos, the merged "cat</w>"
    model = _uvit(clip_dim=32, num_text_tokens=16)
    pipe = _quiet(
        UViTPipeline(
            transformer=UViTTransformer.from_uvit(model),
            scheduler=UViTDPMSolverScheduler.official("discrete"),
            text_encoder=enc,
            tokenizer=tok,
        )
    )
    prompts = ["a cat", "dog", "a cat"]
    kw = dict(prompt=prompts, num_inference_steps=3, output_type="latent")
    guided = pipe(guidance_scale=1.0, **kw).images
    plain = pipe(guidance_scale=0.0, **kw).images
    assert guided.shape == (3, 3, 8, 8) and not torch.allclose(guided, plain, atol=1e-4)

    # reference: the same sampler, with context = CLIP(prompt) and the unconditional CLIP("")
    from uvit.diffusion import classifier_free_guidance

    # CLIP's last hidden state, computed here with the tokenizer and text model themselves.
    def clip(texts: list[str]) -> torch.Tensor:
        ids = tok(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return enc(input_ids=ids).last_hidden_state

    ctx, empty = clip(prompts), clip([""])
    assert ctx.shape == (3, 16, 32) and empty.shape == (1, 16, 32)
    with torch.no_grad():
        assert torch.equal(pipe.encode_prompt(prompts), ctx)
    sched = make_schedule("discrete")
    net = classifier_free_guidance(model, 1.0, {"context": ctx}, {"context": empty})
    with torch.no_grad():
        x_T = PerSampleNoise(sample_seeds(0, 3)).randn((3, 8, 8))
        want = sample("dpm_solver_pp", wrap_model(net, sched), sched, x_T, 3)
    assert torch.equal(guided, want)

    pipe.save_pretrained(tmp_path / "pipe")
    back = _quiet(UViTPipeline.from_pretrained(tmp_path / "pipe"))
    assert back.text_encoder is not None and back.tokenizer is not None
    assert torch.equal(back(guidance_scale=1.0, **kw).images, guided)
    with pytest.raises(ValueError, match="prompt"):
        pipe(num_inference_steps=2)
