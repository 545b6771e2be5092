"""Stock diffusers schedulers in UViTPipeline, diffusers' __call__ arguments, and the project's
scheduler wrapper knowing every sampler of uvit.diffusion.

A stock scheduler only fits the discrete (scaled-linear) models: diffusers' timestep k has the
alpha-bar of k + 1 betas, which is the U-ViT network's time n = k + 1. The references here are
independent of that convention: the project's samplers work in continuous t and never see k.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from uvit.diffusion import ALL_SAMPLERS, PerSampleNoise, classifier_free_guidance, make_schedule, sample, wrap_model
from uvit.diffusion.samplers import UniPCOptions
from uvit.evaluate.diffusers_pipeline import UViTPipeline, UViTTransformer
from uvit.evaluate.sample import sample_seeds
from uvit.evaluate.scheduler import _SOLVER_KWARGS, SOLVERS, UViTDPMSolverScheduler
from uvit.models import UViT, UViTConfig

TINY = dict(img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2)
LABELS = [0, 1, 2, 3]
GUIDE = 0.5


def _uvit(**kw) -> UViT:
    torch.manual_seed(0)
    return UViT(UViTConfig(**{**TINY, **kw})).eval()


@pytest.fixture(scope="module")
def latent_model() -> UViT:
    """A latent-shaped (4-channel) class-conditional model: 4 classes + the null class 4."""
    return _uvit(in_chans=4, num_classes=5)


def _pipe(model: UViT, scheduler, **kw) -> UViTPipeline:
    pipe = UViTPipeline(transformer=UViTTransformer.from_uvit(model), scheduler=scheduler, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(**kw) -> UViTDPMSolverScheduler:
    return UViTDPMSolverScheduler(schedule="discrete", **kw)


def _run(pipe: UViTPipeline, steps: int, **kw) -> torch.Tensor:
    kw = {"class_labels": LABELS, "guidance_scale": GUIDE, **kw}
    return pipe(num_inference_steps=steps, output_type="latent", **kw).images


def _reference(model: UViT, name: str, steps: int, labels=LABELS, seeds=None, schedule="discrete", x_T=None, **kw):
    """uvit.diffusion.sample with the project's CFG rule, from the pipeline's default seeds."""
    sched = make_schedule(schedule)
    y = torch.tensor(labels)
    net = classifier_free_guidance(model, GUIDE, {"y": y}, {"y": torch.full_like(y, 4)})
    noise = PerSampleNoise(sample_seeds(0, len(labels)) if seeds is None else seeds)
    x = noise.randn((model.config.in_chans, 8, 8)) if x_T is None else x_T
    with torch.no_grad():
        return sample(name, wrap_model(net, sched), sched, x, steps, noise=noise, **kw)


# ---------------------------------------------------------------------------- parity with diffusers
PARITY_TOL = 1e-4


@pytest.mark.parametrize("steps,lower_order_final", [(9, True), (9, False), (27, True)])
def test_dpm_solver_pp_2m_equals_diffusers_dpm_solver_multistep(latent_model, steps, lower_order_final):
    """Our DPM-Solver++(2M) and diffusers' DPMSolverMultistepScheduler give the same latents.

    The settings that make them the same solver: diffusers' scaled-linear betas (0.00085, 0.012,
    1000), dpmsolver++ order 2, timestep_spacing="linspace" and final_sigmas_type="sigma_min"
    (the last step ends at timestep 0, i.e. n = 1 = our t_end 1e-3, not at sigma = 0), and our
    skip_type="time_uniform". The grids are then the same only when 999 / steps is an integer
    (9, 27, ...): diffusers rounds linspace(0, 999, steps + 1) to integer timesteps, we do not, so
    at 12 steps a grid point moves by up to half a timestep (checked below to exceed the tolerance).
    The final-order rule differs too: ours lowers the last step to first order below 10 steps,
    diffusers below 15; 9 and 27 lie on the same side of both (and lower_order_final=False
    removes the rule on both sides).

    Tolerance, measured: the latents reach |x| ~ 49 (a random tiny model's x0 predictions); the
    two differ by 2.3e-5 to 3.8e-5 (~8e-7 relative), diffusers computing its alphas_cumprod and
    its updates in float32, we in float64. 1e-4 leaves ~2.5x headroom and is 7x below the 12-step
    grid shift and ~100x below the 2M/3M difference.
    """
    ours = _run(
        _pipe(
            latent_model,
            _ours(solver="dpm_solver_pp_2m", skip_type="time_uniform", lower_order_final=lower_order_final),
        ),
        steps,
    )
    pipe = _pipe(latent_model, _ours())
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config,
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing="linspace",
        final_sigmas_type="sigma_min",
        lower_order_final=lower_order_final,
    )
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.beta_end == 0.012
    theirs = _run(pipe, steps)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=PARITY_TOL)
    assert ours.abs().max() > 10  # the tolerance is measured at this scale
    # the project's reference, outside any pipeline
    want = _reference(
        latent_model, "dpm_solver_pp_2m", steps, skip_type="time_uniform", lower_order_final=lower_order_final
    )
    assert torch.equal(ours, want)
    third = _reference(latent_model, "dpm_solver_pp_3m", steps, skip_type="time_uniform")
    assert (third - theirs).abs().max() > 10 * PARITY_TOL  # the tolerance tells solvers apart


def test_parity_tolerance_sees_a_grid_shift(latent_model):
    """At 12 steps diffusers' integer timesteps are not our grid: a real difference, not noise."""
    ours = _run(_pipe(latent_model, _ours(solver="dpm_solver_pp_2m", skip_type="time_uniform")), 12)
    stock = DPMSolverMultistepScheduler.from_config(
        _ours().config, solver_order=2, timestep_spacing="linspace", final_sigmas_type="sigma_min"
    )
    pipe = _pipe(latent_model, stock, schedule="discrete")
    assert (ours - _run(pipe, 12)).abs().max() > 5 * PARITY_TOL


@pytest.mark.parametrize("name", ["dpm_solver_pp_3m", "unipc_bh1", "unipc_bh2"])
def test_low_nfe_samplers_equal_their_stock_schedulers(latent_model, name):
    stock = (
        DPMSolverMultistepScheduler.from_config(
            _ours().config, solver_order=3, timestep_spacing="linspace", final_sigmas_type="sigma_min"
        )
        if name.endswith("3m")
        else UniPCMultistepScheduler.from_config(
            _ours().config,
            solver_type=name[-3:],
            solver_order=2,
            timestep_spacing="linspace",
            final_sigmas_type="sigma_min",
        )
    )
    theirs = _run(_pipe(latent_model, stock, schedule="discrete"), 9)
    ours = _run(_pipe(latent_model, _ours(solver=name, skip_type="time_uniform")), 9)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=PARITY_TOL)


def test_ddim_and_euler_equal_first_order_dpm_solver(latent_model):
    """DDIM (eta 0) and Euler on the probability-flow ODE in sigma are both DPM-Solver-1.

    With "trailing" spacing over 10 steps both evaluate the network at n = 1000, 900, ..., 100 and
    end at sigma = 0 (DDIM: set_alpha_to_one); ours: 9 time-uniform steps to t = 0.1, then the x0
    prediction there (denoise_final). Euler runs in x / alpha with a scaled model input; its
    init_noise_sigma for "trailing" spacing is sigma_max, diffusers' stand-in for 1 / alpha_T =
    sqrt(sigma_max^2 + 1) (0.23% off, a 0.12 difference here), so it gets `latents` that make
    latents * init_noise_sigma = x_T / alpha_T exactly: this checks that the loop scales
    `latents` by init_noise_sigma and honours scale_model_input, as diffusers' pipelines do.
    """
    ours = _run(
        _pipe(
            latent_model,
            _ours(solver="dpm_solver_pp", order=1, skip_type="time_uniform", t_end=0.1, denoise_final=True),
        ),
        9,
    )
    cfg = _ours().config
    ddim = DDIMScheduler.from_config(cfg, timestep_spacing="trailing", set_alpha_to_one=True)
    assert ddim.config.clip_sample is False  # carried by our config; diffusers' default would clip latents
    torch.testing.assert_close(ours, _run(_pipe(latent_model, ddim, schedule="discrete"), 10), rtol=0, atol=PARITY_TOL)

    euler = EulerDiscreteScheduler.from_config(cfg, timestep_spacing="trailing")
    euler.set_timesteps(10)
    alpha_T = math.sqrt(float(make_schedule("discrete").alphas_cumprod[-1]))
    x_T = PerSampleNoise(sample_seeds(0, len(LABELS))).randn((4, 8, 8))
    latents = x_T / (alpha_T * float(euler.init_noise_sigma))
    theirs = _run(_pipe(latent_model, euler, schedule="discrete"), 10, latents=latents)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=PARITY_TOL)


# ---------------------------------------------------------------------------- where stock schedulers fit
def test_stock_scheduler_refusals(latent_model, tmp_path):
    vp = _pipe(latent_model, UViTDPMSolverScheduler(schedule="vpsde"))
    vp.scheduler = DPMSolverMultistepScheduler.from_config(vp.scheduler.config)
    with pytest.raises(ValueError, match="continuous VP SDE"):
        _run(vp, 3)
    disc = _pipe(latent_model, _ours())
    for bad, why in (
        (DPMSolverMultistepScheduler(), "betas"),  # diffusers' default linear 1e-4..0.02
        (DPMSolverMultistepScheduler.from_config(disc.scheduler.config, prediction_type="v_prediction"), "epsilon"),
        (FlowMatchEulerDiscreteScheduler(), "alphas_cumprod"),
    ):
        disc.scheduler = bad
        with pytest.raises(ValueError, match=why):
            _run(disc, 3)
    disc.scheduler = UViTDPMSolverScheduler(schedule="vpsde")
    with pytest.raises(ValueError, match="trained on one schedule"):
        _run(disc, 3)
    with pytest.raises(ValueError, match="schedule="):  # a stock scheduler cannot say the model's schedule
        _pipe(latent_model, DPMSolverMultistepScheduler.from_config(_ours().config))


def test_stock_scheduler_pipeline_saves_and_loads(latent_model, tmp_path):
    pipe = _pipe(latent_model, _ours())
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    want = _run(pipe, 5)
    pipe.save_pretrained(tmp_path)
    back = UViTPipeline.from_pretrained(tmp_path)
    back.set_progress_bar_config(disable=True)
    assert isinstance(back.scheduler, UniPCMultistepScheduler) and back.config.schedule == "discrete"
    assert torch.equal(_run(back, 5), want)
    # and back to the project's scheduler, from the stock config: the discrete schedule is inferred
    back.scheduler = UViTDPMSolverScheduler.from_config(back.scheduler.config, solver="dpm_solver_pp_2m")
    assert back.scheduler.config.schedule == "discrete"
    assert torch.equal(_run(back, 5), _reference(latent_model, "dpm_solver_pp_2m", 5))


def test_stochastic_stock_scheduler_draws_per_sample_noise(latent_model):
    """SDE-DPM-Solver++ draws its noise from each sample's generator: image i depends on seeds[i]
    only, not on the batch split, the other images or the global RNG."""
    sde = DPMSolverMultistepScheduler.from_config(_ours().config, algorithm_type="sde-dpmsolver++")
    pipe = _pipe(latent_model, sde, schedule="discrete")
    seeds = [11, 12, 13, 14]
    all4 = _run(pipe, 5, seeds=seeds)
    torch.manual_seed(123)
    split = _run(pipe, 5, seeds=seeds, batch_size=3)
    torch.manual_seed(456)
    one = _run(pipe, 5, class_labels=[LABELS[2]], seeds=seeds[2:3])
    torch.testing.assert_close(split, all4, rtol=0, atol=1e-5)
    torch.testing.assert_close(one[0], all4[2], rtol=0, atol=1e-5)
    ode = _run(
        _pipe(latent_model, DPMSolverMultistepScheduler.from_config(_ours().config), schedule="discrete"),
        5,
        seeds=seeds,
    )
    assert (ode - all4).abs().max() > 1e-2  # the noise is really there


# ---------------------------------------------------------------------------- diffusers' __call__ arguments
def test_num_images_per_prompt_repeats_each_label_in_a_row(latent_model):
    pipe = _pipe(latent_model, _ours(solver="dpm_solver_pp_2m"))
    got = _run(pipe, 3, class_labels=[1, 3], num_images_per_prompt=2)
    assert got.shape == (4, 4, 8, 8)
    assert torch.equal(got, _reference(latent_model, "dpm_solver_pp_2m", 3, labels=[1, 1, 3, 3]))
    uncond = _pipe(_uvit(in_chans=4), _ours(solver="dpm_solver_pp_2m"))
    out = uncond(num_images=2, num_images_per_prompt=3, num_inference_steps=2, output_type="latent").images
    assert out.shape[0] == 6
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        _run(pipe, 3, num_images_per_prompt=0)


@pytest.mark.parametrize("stock", [False, True])
def test_latents_replace_the_seeded_noise(latent_model, stock):
    sched = EulerDiscreteScheduler.from_config(_ours().config) if stock else _ours(solver="dpm_solver_pp_2m")
    pipe = _pipe(latent_model, sched, schedule="discrete")
    seeded = _run(pipe, 4)
    x_T = PerSampleNoise(sample_seeds(0, 4)).randn((4, 8, 8))
    assert torch.equal(_run(pipe, 4, latents=x_T), seeded)  # the seeds' own draws: the same images
    other = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    got = _run(pipe, 4, latents=other)
    assert not torch.allclose(got, seeded, atol=1e-2)
    if not stock:
        assert torch.equal(got, _reference(latent_model, "dpm_solver_pp_2m", 4, x_T=other))
    with pytest.raises(ValueError, match="latents have shape"):
        _run(pipe, 4, latents=other[:3])


def test_generator_list_draws_one_seed_per_image(latent_model):
    pipe = _pipe(latent_model, _ours(solver="dpm_solver_pp_2m"))
    gens = [torch.Generator().manual_seed(s) for s in (7, 8, 9, 10)]
    a = _run(pipe, 2, generator=gens)
    b = _run(pipe, 2, class_labels=LABELS[1:], generator=[torch.Generator().manual_seed(s) for s in (8, 9, 10)])
    assert torch.equal(a[1:], b)  # image i depends on its own generator only


@pytest.mark.parametrize("stock", [False, True])
def test_callback_on_step_end(latent_model, stock):
    sched = DPMSolverMultistepScheduler.from_config(_ours().config) if stock else _ours(solver="dpm_solver_pp_2m")
    pipe = _pipe(latent_model, sched, schedule="discrete")
    plain = _run(pipe, 5)
    seen: list[tuple[int, float, torch.Tensor]] = []

    def record(p, i, t, kw):
        assert p is pipe and set(kw) == {"latents"}
        seen.append((i, float(t), kw["latents"].clone()))
        return {}

    assert torch.equal(_run(pipe, 5, callback_on_step_end=record), plain)  # a no-op callback: the same images
    assert [s[0] for s in seen] == list(range(5)) and pipe.num_timesteps == 5
    assert [s[1] for s in seen] == [float(t) for t in pipe.scheduler.timesteps]
    assert torch.equal(seen[-1][2], plain)

    def stop_after_two(p, i, t, kw):
        p._interrupt = i == 1
        return {}

    assert torch.equal(_run(pipe, 5, callback_on_step_end=stop_after_two), seen[1][2])

    def zero_at_end(p, i, t, kw):
        return {"latents": torch.zeros_like(kw["latents"])} if i == 4 else {}

    assert torch.equal(_run(pipe, 5, callback_on_step_end=zero_at_end), torch.zeros_like(plain))
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        _run(pipe, 5, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_callback_needs_a_step_loop(latent_model):
    pipe = _pipe(latent_model, _ours(solver="dpm_solver_pp"))
    with pytest.raises(ValueError, match="step loop"):
        _run(pipe, 3, callback_on_step_end=lambda p, i, t, kw: {})


def test_output_types_with_a_stock_scheduler(latent_model):
    pipe = _pipe(_uvit(num_classes=5), DPMSolverMultistepScheduler.from_config(_ours().config), schedule="discrete")
    lat = _run(pipe, 3)
    pt = pipe(class_labels=LABELS, guidance_scale=GUIDE, num_inference_steps=3, output_type="pt").images
    arr = pipe(class_labels=LABELS, guidance_scale=GUIDE, num_inference_steps=3, output_type="np").images
    assert torch.allclose(pt, ((lat + 1) / 2).clamp(0, 1)) and arr.shape == (4, 8, 8, 3)
    assert torch.allclose(torch.from_numpy(arr), pt.permute(0, 2, 3, 1))
    pil = pipe(class_labels=LABELS, guidance_scale=GUIDE, num_inference_steps=3).images
    assert len(pil) == 4 and pil[0].size == (8, 8)


# ---------------------------------------------------------------------------- the project's wrapper
def test_wrapper_knows_every_sampler():
    assert set(SOLVERS) == set(ALL_SAMPLERS)
    for name, keys in _SOLVER_KWARGS.items():
        fn = UniPCOptions if name.startswith("unipc") else ALL_SAMPLERS[name]
        assert set(keys) <= set(inspect.signature(fn).parameters), name


@pytest.mark.parametrize("name", sorted(ALL_SAMPLERS))
def test_wrapper_equals_sample_for_every_sampler(latent_model, name):
    schedule = "vpsde" if name == "euler_maruyama" else "discrete"
    steps = 20 if name == "euler_maruyama" else 6
    sched = UViTDPMSolverScheduler(schedule=schedule, solver=name)
    sched.set_timesteps(steps)
    assert len(sched.timesteps) == sched.num_model_evaluations(steps)
    got = _run(_pipe(latent_model, sched), steps)
    assert torch.equal(got, _reference(latent_model, name, steps, schedule=schedule))


@pytest.mark.parametrize(
    "name,kw",
    [
        ("unipc_bh2", dict(order=3, skip_type="time_quadratic")),
        ("unipc_bh1", dict(order=1, lower_order_final=False, denoise_final=True)),
        ("dpm_solver_pp_3m", dict(skip_type="time_uniform", t_end=2e-3, denoise_final=True)),
        ("dpm_solver", dict(order=2, denoise_final=True)),
    ],
)
def test_wrapper_passes_sampler_options(latent_model, name, kw):
    got = _run(_pipe(latent_model, _ours(solver=name, **kw)), 7)
    assert torch.equal(got, _reference(latent_model, name, 7, **kw))
    assert not torch.equal(got, _reference(latent_model, name, 7))  # the options matter


@pytest.mark.parametrize(
    "solver,kw",
    [
        ("dpm_solver_pp_3m", {}),
        ("dpm_solver_pp_3m", dict(lower_order_final=False)),
        ("dpm_solver_pp_3m", dict(denoise_final=True)),
        ("dpm_solver_pp_2m", dict(denoise_final=True)),
    ],
)
def test_step_loop_equals_sample(latent_model, solver, kw):
    sch = _ours(solver=solver, **kw)
    y = torch.tensor([0, 3])
    x_T = PerSampleNoise([3, 4]).randn((4, 8, 8))
    with torch.no_grad():
        want = sch.sample(wrap_model(lambda x, t: latent_model(x, t, y=y), sch.noise_schedule), x_T, 7)
        sch.set_timesteps(7)
        assert len(sch.timesteps) == 7 + int(bool(kw.get("denoise_final")))
        x = x_T
        for t in sch.timesteps:
            x = sch.step(latent_model(x, t, y=y), t, x).prev_sample
    assert torch.equal(x, want)
    with pytest.raises(RuntimeError, match="steps are done"):
        sch.step(x, sch.timesteps[-1], x)


def test_wrapper_refuses_what_it_cannot_express():
    with pytest.raises(ValueError, match="valid choices"):
        UViTDPMSolverScheduler(solver="ddim")
    with pytest.raises(NotImplementedError, match="sample"):
        sch = _ours(solver="unipc_bh2")
        sch.set_timesteps(3)
        sch.step(torch.zeros(1, 1), sch.timesteps[0], torch.zeros(1, 1))
