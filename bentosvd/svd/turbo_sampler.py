"""The sampler of AnimateLCM-SVD-xt, the few-step ("turbo") SVD-XT, and the authors' defaults.

AnimateLCM-SVD-xt (Wang et al. 2024, https://arxiv.org/abs/2402.00769; weights on the hub at
`wangfuyun/AnimateLCM-SVD-xt`) is SVD-XT's UNet consistency-distilled: same architecture and
config, new weights, 25 frames in 1-8 steps (4 by default) without classifier-free guidance.
It runs in diffusers' `StableVideoDiffusionPipeline` unchanged; only the scheduler differs.

The authors' scheduler, `AnimateLCMSVDStochasticIterativeScheduler` (G-U-N/AnimateLCM,
`animatelcm_svd/animatelcm_scheduler.py`), is a copy of diffusers'
`CMStochasticIterativeScheduler` (multistep consistency sampling: denoise, then re-noise to
the next sigma) changed in five places. `AnimateLCMSVDScheduler` below subclasses diffusers'
class and overrides only those:

1. `sigma_to_t`: the UNet's timestep is `0.25 * log(sigma)` (SVD's EDM c_noise, what SVD's
   own EulerDiscreteScheduler gives with timestep_type="continuous"), not diffusers'
   `1000 * 0.25 * log(sigma)` (which was for OpenAI's consistency-model UNets).
2. `init_noise_sigma` is `sqrt(sigma_max**2 + 1)` (as SVD's Euler scheduler), not `sigma_max`.
3. `set_timesteps`: the schedule ends at sigma 0, not at sigma_min.
4. `get_scalings_for_boundary_condition`: SVD's v-prediction preconditioning (sgm's
   VScaling): c_skip = sd^2 / (sigma^2 + sd^2), c_out = -sigma * sd / sqrt(sigma^2 + sd^2),
   with no sigma_min shift (diffusers': c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2),
   c_out = +(sigma - sigma_min) * sd / sqrt(sigma^2 + sd^2)).
5. `step` re-noises with `denoised + z * clamp(sigma_next, 0, sigma_max)` (diffusers':
   `z * sqrt(clamp(sigma_next, sigma_min, sigma_max)^2 - sigma_min^2)`).

Also added here (not in the authors' class): `generator`, a fallback for `step`.
diffusers' SVD pipeline calls `scheduler.step(noise_pred, t, latents)` without the request's
generator, so the re-noising noise of steps 1..n-1 would come from torch's global RNG (the
authors' app seeds it with `torch.manual_seed(seed)`); set `scheduler.generator` to the
request's generator before the pipeline call to make a seed reproduce its video.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_consistency_models import (
    CMStochasticIterativeScheduler,
    CMStochasticIterativeSchedulerOutput,
)
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

logger = logging.get_logger(__name__)

# The scheduler as the authors construct it, in G-U-N/AnimateLCM animatelcm_svd/app.py
# (`noise_scheduler = AnimateLCMSVDStochasticIterativeScheduler(...)`, commits 413037e and
# a86729b) and, identically, in animatelcm_svd/batch_inference.py (commit b918ab9). Their
# class's own __init__ defaults are the consistency-model ones (sigma_max=80, sigma_data=0.5,
# clip_denoised=True) and are NOT what the model was distilled with; these are.
TURBO_SCHEDULER_CONFIG = dict(
    num_train_timesteps=40,  # = the --N=40 of their train_svd_lcm.py (the discretisation)
    sigma_min=0.002,  # = SVD's scheduler_config.json
    sigma_max=700.0,  # = SVD's scheduler_config.json
    sigma_data=1.0,  # SVD's v-prediction scaling (sgm VScaling), not EDM's 0.5
    s_noise=1.0,
    rho=7.0,  # app.py passes the int 7
    clip_denoised=False,  # latents are not in [-1, 1]
)

# The authors' sampling defaults. Sources, all in G-U-N/AnimateLCM unless said:
#   app.py        = animatelcm_svd/app.py, `sample()`'s defaults and its `pipe(...)` call
#   pipeline.py   = animatelcm_svd/pipeline.py, their copy of diffusers' SVD pipeline, whose
#                   __call__ defaults apply where app.py passes nothing
#   batch.py      = animatelcm_svd/batch_inference.py
#   model card    = huggingface.co/wangfuyun/AnimateLCM-SVD-xt README.md
TURBO_DEFAULTS = dict(
    # app.py num_inference_steps=4 (its slider: 1-20); batch.py tries 1, 2, 4, 8; model card:
    # "good quality ... in 2~8 steps", "in 4 steps without requiring classifier-free guidance".
    num_inference_steps=4,
    # Model card: no CFG needed, all its demos "cfg=1"; batch.py runs (min, max) = (1.0, 1.0).
    # app.py's defaults are min 1.0, max 1.2 instead (CFG on: twice the UNet batch); see
    # TURBO_APP_GUIDANCE. Guidance 1 means the pipeline makes one UNet call of batch 1 a step.
    min_guidance_scale=1.0,
    max_guidance_scale=1.0,
    # The `fps` the pipeline is conditioned with: app.py passes none, so pipeline.py's default
    # 7 (the UNet sees fps - 1 = 6). app.py's `fps_id=8` is only the playback rate handed to
    # export_to_video: see video_fps.
    fps=7,
    video_fps=8,  # app.py fps_id=8 -> export_to_video(frames, path, fps=fps_id)
    motion_bucket_id=80,  # app.py motion_bucket_id=80 (passed to pipe); SVD's default is 127
    noise_aug_strength=0.02,  # pipeline.py default; app.py and batch.py pass none
    decode_chunk_size=4,  # app.py decoding_t=4 (batch.py uses 8)
    num_frames=25,  # SVD-XT's unet config num_frames; batch.py passes num_frames=25
    height=576,  # app.py height=576, width=1024; model card "576x1024 resolutions"
    width=1024,
    seed=42,  # app.py seed=42
)

# app.py's guidance defaults (its gradio sliders: max 1-2, min 1-1.5): CFG on, about twice
# the UNet work per step of TURBO_DEFAULTS.
TURBO_APP_GUIDANCE = dict(min_guidance_scale=1.0, max_guidance_scale=1.2)

# Where the UNet weights are: files at the root of the hub repo (no diffusers `unet/` folder,
# no config.json), each a full UNetSpatioTemporalConditionModel state dict in diffusers' key
# names (6.1 GB, fp32), loaded by app.py with `pipe.unet.load_state_dict(sd, strict=True)` into
# the UNet of stabilityai/stable-video-diffusion-img2vid-xt (whose unet/config.json applies).
TURBO_HUB_REPO = "wangfuyun/AnimateLCM-SVD-xt"
TURBO_UNET_FILES = dict(
    default="AnimateLCM-SVD-xt-1.1.safetensors",  # what app.py loads (`model_select`)
    v1_0="AnimateLCM-SVD-xt.safetensors",
)
TURBO_BASE_REPO = "stabilityai/stable-video-diffusion-img2vid-xt"  # app.py, fp16 variant


class AnimateLCMSVDScheduler(CMStochasticIterativeScheduler):
    """AnimateLCM-SVD-xt's sampler: diffusers' `CMStochasticIterativeScheduler` with the
    changes of the authors' `AnimateLCMSVDStochasticIterativeScheduler` (see the module's
    docstring); its defaults are the authors' `TURBO_SCHEDULER_CONFIG`.

    For `StableVideoDiffusionPipeline(..., scheduler=AnimateLCMSVDScheduler())`. Between two
    pipeline calls it holds per-generation state (`_step_index`, `generator`), as every
    diffusers scheduler does: one generation at a time per instance.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 40,
        sigma_min: float = 0.002,
        sigma_max: float = 700.0,
        sigma_data: float = 1.0,
        s_noise: float = 1.0,
        rho: float = 7.0,
        clip_denoised: bool = False,
    ):
        super().__init__(
            num_train_timesteps=num_train_timesteps, sigma_min=sigma_min, sigma_max=sigma_max,
            sigma_data=sigma_data, s_noise=s_noise, rho=rho, clip_denoised=clip_denoised,
        )
        self.init_noise_sigma = (sigma_max**2 + 1) ** 0.5  # (2)
        # Used by `step` when it is given no generator (diffusers' SVD pipeline gives none).
        self.generator: torch.Generator | list[torch.Generator] | None = None

    def sigma_to_t(self, sigmas):  # (1)
        if not isinstance(sigmas, np.ndarray):
            sigmas = np.array(sigmas, dtype=np.float64)
        return 0.25 * np.log(sigmas + 1e-44)

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):  # (3)
        super().set_timesteps(num_inference_steps, device=device, timesteps=timesteps)
        self.sigmas[-1] = 0.0  # diffusers appends sigma_min; the authors append 0

    def get_scalings_for_boundary_condition(self, sigma):  # (4)
        sigma_data = self.config.sigma_data
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = -sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
        return c_skip, c_out

    get_scalings = get_scalings_for_boundary_condition  # the authors' are the same too

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):  # (5)
        """diffusers' `step` with the authors' re-noising: the consistency function's
        estimate `denoised = c_skip * sample + c_out * model_output`, then
        `denoised + s_noise * z * sigma_next` (sigma_next is 0 after the last step)."""
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
                f" `{self.__class__}.step()` is not supported. Make sure to pass"
                " one of the `scheduler.timesteps` as a timestep."
            )
        if not self.is_scale_input_called:
            logger.warning("The `scale_model_input` function should be called before `step` "
                           "to ensure correct denoising.")
        if self.step_index is None:
            self._init_step_index(timestep)

        sigma = self.sigmas[self.step_index]
        if self.step_index + 1 < self.config.num_train_timesteps:
            sigma_next = self.sigmas[self.step_index + 1]
        else:
            sigma_next = self.sigmas[-1]

        c_skip, c_out = self.get_scalings_for_boundary_condition(sigma)
        denoised = c_out * model_output + c_skip * sample
        if self.config.clip_denoised:
            denoised = denoised.clamp(-1, 1)

        # One-step sampling adds no noise (and draws none).
        if len(self.timesteps) > 1:
            noise = randn_tensor(
                model_output.shape, dtype=model_output.dtype, device=model_output.device,
                generator=generator if generator is not None else self.generator,
            )
        else:
            noise = torch.zeros_like(model_output)
        z = noise * self.config.s_noise
        sigma_hat = sigma_next.clamp(min=0, max=self.config.sigma_max)
        prev_sample = denoised + z * sigma_hat

        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return CMStochasticIterativeSchedulerOutput(prev_sample=prev_sample)
