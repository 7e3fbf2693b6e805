"""bentosvd.svd.turbo_sampler: AnimateLCM-SVD-xt's scheduler against the authors' algorithm,
and inside a real (tiny, random) StableVideoDiffusionPipeline on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableVideoDiffusionPipeline
from PIL import Image

from bentosvd.svd.turbo_sampler import (
    TURBO_DEFAULTS,
    TURBO_SCHEDULER_CONFIG,
    AnimateLCMSVDScheduler,
)
from bentosvd.weights.random_weights import build_demo

STEPS = (1, 2, 4, 8)


# --------------------------------------------------------------------------------------
# Reference: TRANSCRIBED from the authors' code, G-U-N/AnimateLCM,
# animatelcm_svd/animatelcm_scheduler.py (commit 413037e49f1c46ac19156d49890043c5704dc4da),
# class AnimateLCMSVDStochasticIterativeScheduler: __init__ (init_noise_sigma),
# set_timesteps + _convert_to_karras + sigma_to_t (the schedule), scale_model_input,
# get_scalings_for_boundary_condition + step (the update), written out as plain functions so
# that nothing here goes through bentosvd's class or diffusers' CMStochasticIterativeScheduler.
# Their config is the one animatelcm_svd/app.py builds (written out again here on purpose).
# --------------------------------------------------------------------------------------
AUTHORS_CONFIG = dict(num_train_timesteps=40, sigma_min=0.002, sigma_max=700.0, sigma_data=1.0,
                      s_noise=1.0, rho=7, clip_denoised=False)


def ref_init_noise_sigma(cfg=AUTHORS_CONFIG):
    return (cfg["sigma_max"] ** 2 + 1) ** 0.5


def ref_schedule(num_inference_steps, cfg=AUTHORS_CONFIG):
    """(sigmas float32 with a final 0, timesteps float64), as their set_timesteps leaves them."""
    n_train = cfg["num_train_timesteps"]
    step_ratio = n_train // num_inference_steps
    timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].copy()
    timesteps = timesteps.astype(np.int64)
    ramp = timesteps[::-1].copy()
    ramp = ramp / (n_train - 1)
    # _convert_to_karras
    rho = cfg["rho"]
    min_inv_rho = cfg["sigma_min"] ** (1 / rho)
    max_inv_rho = cfg["sigma_max"] ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    # sigma_to_t
    timesteps = 0.25 * np.log(sigmas + 1e-44)
    sigmas = np.concatenate([sigmas, [0]]).astype(np.float32)
    return torch.from_numpy(sigmas), torch.from_numpy(timesteps)


def ref_scale_model_input(sample, sigma, cfg=AUTHORS_CONFIG):
    return sample / ((sigma**2 + cfg["sigma_data"] ** 2) ** 0.5)


def ref_step(model_output, sample, sigma, sigma_next, noise, cfg=AUTHORS_CONFIG):
    """Their step() once sigma / sigma_next are picked; `noise` is their randn_tensor draw
    (zeros for one-step sampling)."""
    sigma_data = cfg["sigma_data"]
    c_skip = sigma_data**2 / ((sigma) ** 2 + sigma_data**2)
    c_out = -sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    denoised = c_out * model_output + c_skip * sample
    if cfg["clip_denoised"]:
        denoised = denoised.clamp(-1, 1)
    z = noise * cfg["s_noise"]
    sigma_hat = sigma_next.clamp(min=0, max=cfg["sigma_max"])
    return denoised + z * sigma_hat


def ref_sample(model, x, num_inference_steps, seed):
    """Their sampling loop (diffusers' SVD pipeline's denoising loop around their scheduler,
    guidance 1), noise from torch.Generator().manual_seed(seed) in their draw order."""
    sigmas, timesteps = ref_schedule(num_inference_steps)
    gen = torch.Generator().manual_seed(seed)
    x = x * ref_init_noise_sigma()
    trajectory = []
    for i, t in enumerate(timesteps):
        out = model(ref_scale_model_input(x, sigmas[i]), t)
        if len(timesteps) > 1:
            noise = torch.randn(out.shape, generator=gen, dtype=out.dtype)
        else:
            noise = torch.zeros_like(out)
        x = ref_step(out, x, sigmas[i], sigmas[i + 1], noise)
        trajectory.append(x)
    return trajectory
# ------------------------------- end of the transcription -------------------------------


def fake_unet(x, t):
    """A fixed, nonlinear stand-in for the UNet that depends on both its input and t."""
    return torch.tanh(0.8 * x + float(t)) * 0.9 + 0.05 * x.roll(1, dims=-1)


def sample_with(scheduler, x, num_inference_steps, seed, via_attribute=False):
    """The calls diffusers' StableVideoDiffusionPipeline makes (guidance 1)."""
    scheduler.set_timesteps(num_inference_steps, device="cpu")
    gen = torch.Generator().manual_seed(seed)
    if via_attribute:
        scheduler.generator = gen
    x = x * scheduler.init_noise_sigma
    trajectory = []
    for t in scheduler.timesteps:
        out = fake_unet(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, **({} if via_attribute else {"generator": gen})).prev_sample
        trajectory.append(x)
    return trajectory


def test_defaults_are_the_authors_config():
    assert TURBO_SCHEDULER_CONFIG == AUTHORS_CONFIG
    config = AnimateLCMSVDScheduler().config
    assert {k: config[k] for k in AUTHORS_CONFIG} == AUTHORS_CONFIG
    assert AnimateLCMSVDScheduler.order == 1
    assert TURBO_DEFAULTS["num_inference_steps"] == 4
    assert TURBO_DEFAULTS["min_guidance_scale"] == TURBO_DEFAULTS["max_guidance_scale"] == 1.0


@pytest.mark.parametrize("steps", STEPS)
def test_schedule_is_the_authors(steps):
    scheduler = AnimateLCMSVDScheduler(**TURBO_SCHEDULER_CONFIG)
    scheduler.set_timesteps(steps, device="cpu")
    sigmas, timesteps = ref_schedule(steps)
    assert scheduler.sigmas.dtype == torch.float32 and scheduler.timesteps.dtype == torch.float64
    torch.testing.assert_close(scheduler.sigmas, sigmas, rtol=0, atol=0)
    torch.testing.assert_close(scheduler.timesteps, timesteps, rtol=1e-12, atol=1e-12)
    assert scheduler.init_noise_sigma == pytest.approx(ref_init_noise_sigma(), rel=1e-12)
    # Worked by hand: the first sigma is sigma_max, the timestep SVD's c_noise 0.25 ln(sigma).
    assert scheduler.sigmas[0].item() == 700.0 and scheduler.sigmas[-1].item() == 0.0
    assert scheduler.timesteps[0].item() == pytest.approx(0.25 * np.log(700.0), rel=1e-12)
    assert len(scheduler.timesteps) == steps and len(scheduler.sigmas) == steps + 1


@pytest.mark.parametrize("steps", STEPS)
def test_updates_are_the_authors(steps):
    x = torch.randn(1, 5, 4, 6, 8, generator=torch.Generator().manual_seed(1))
    expected = ref_sample(fake_unet, x, steps, seed=123)
    scheduler = AnimateLCMSVDScheduler()
    for via_attribute in (False, True):
        got = sample_with(scheduler, x, steps, seed=123, via_attribute=via_attribute)
        assert len(got) == steps
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(got[-1]).all()


def test_one_step_draws_no_noise():
    scheduler = AnimateLCMSVDScheduler()
    x = torch.randn(1, 2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    scheduler.set_timesteps(1)
    t = scheduler.timesteps[0]
    out = fake_unet(scheduler.scale_model_input(x, t), t)
    got = scheduler.step(out, t, x, generator=gen).prev_sample
    assert torch.equal(gen.get_state(), state)
    sigma = scheduler.sigmas[0]
    torch.testing.assert_close(got, x / (sigma**2 + 1) - sigma / (sigma**2 + 1) ** 0.5 * out)


def test_config_round_trips(tmp_path):
    scheduler = AnimateLCMSVDScheduler(**TURBO_SCHEDULER_CONFIG)
    scheduler.save_pretrained(tmp_path)
    loaded = AnimateLCMSVDScheduler.from_pretrained(tmp_path)
    assert {k: loaded.config[k] for k in AUTHORS_CONFIG} == AUTHORS_CONFIG
    assert loaded.init_noise_sigma == scheduler.init_noise_sigma


def test_runs_in_the_svd_pipeline_one_unet_call_per_step():
    """A real StableVideoDiffusionPipeline (tiny random parts) with this scheduler, the
    authors' defaults, guidance 1: 4 UNet calls of batch 1 (no CFG doubling), the
    conditioning reaching the UNet, each step's latents those of the transcribed reference,
    and the requested number of frames back."""
    frames, height, width, seed = 3, 64, 96, 7
    parts = build_demo(frames)
    parts["scheduler"] = AnimateLCMSVDScheduler(**TURBO_SCHEDULER_CONFIG)
    pipe = StableVideoDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    steps = TURBO_DEFAULTS["num_inference_steps"]

    calls = []
    handle = pipe.unet.register_forward_hook(
        lambda module, args, kwargs, output: calls.append(
            (args[0].clone(), args[1], kwargs["added_time_ids"].clone(), output[0].clone())),
        with_kwargs=True)
    after_step = []

    def on_step_end(pipe, i, t, kw):
        after_step.append(kw["latents"].clone())
        return kw

    start = torch.randn(1, frames, 4, height // 8, width // 8,
                        generator=torch.Generator().manual_seed(3))
    pipe.scheduler.generator = torch.Generator().manual_seed(seed)
    try:
        video = pipe(
            Image.new("RGB", (width, height), (120, 60, 200)), height=height, width=width,
            num_frames=frames, latents=start.clone(), output_type="np",
            generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step_end,
            decode_chunk_size=TURBO_DEFAULTS["decode_chunk_size"],
            **{k: TURBO_DEFAULTS[k] for k in (
                "num_inference_steps", "min_guidance_scale", "max_guidance_scale", "fps",
                "motion_bucket_id", "noise_aug_strength")},
        ).frames
    finally:
        handle.remove()

    assert video.shape == (1, frames, height, width, 3) and np.isfinite(video).all()
    assert len(calls) == steps  # one UNet call per step
    sigmas, timesteps = ref_schedule(steps)
    fps = TURBO_DEFAULTS["fps"] - 1  # diffusers conditions on fps - 1
    expected_ids = torch.tensor([[fps, TURBO_DEFAULTS["motion_bucket_id"],
                                  TURBO_DEFAULTS["noise_aug_strength"]]])
    x = start * ref_init_noise_sigma()
    noise_gen = torch.Generator().manual_seed(seed)
    for i, (model_in, t, time_ids, out) in enumerate(calls):
        assert model_in.shape[0] == 1  # batch 1: no classifier-free guidance
        assert float(t) == pytest.approx(float(timesteps[i]), rel=1e-12)
        torch.testing.assert_close(time_ids, expected_ids)
        torch.testing.assert_close(model_in[:, :, :4], ref_scale_model_input(x, sigmas[i]),
                                   rtol=1e-6, atol=1e-6)
        noise = torch.randn(out.shape, generator=noise_gen, dtype=out.dtype)
        x = ref_step(out, x, sigmas[i], sigmas[i + 1], noise)
        torch.testing.assert_close(after_step[i], x, rtol=1e-6, atol=1e-5)
