"""SVD components with random weights, built in code: no download needed.

`demo` is tiny so the whole service runs on two CPU cores in seconds (its videos are
noise). `synthetic` is the full-size architecture (SVD's UNet, temporal VAE and the ViT-H/14
CLIP image encoder, 2.2 B parameters) for measuring speed and memory on a GPU.
Both return the five parts a `StableVideoDiffusionPipeline` takes, with the scheduler of
the variant's sampler (SVD's Euler, or the turbo variants' AnimateLCM sampler).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    UNetSpatioTemporalConditionModel,
)
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from bentosvd.svd.turbo_sampler import TURBO_SCHEDULER_CONFIG, AnimateLCMSVDScheduler

# SVD's scheduler, as shipped in the Stability repos' scheduler_config.json.
SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
    sigma_min=0.002, sigma_max=700.0, use_karras_sigmas=True, timestep_type="continuous",
    timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
)

# CLIP's normalisation; SVD resizes to 224 itself before calling the processor.
FEATURE_EXTRACTOR_CONFIG = dict(
    crop_size={"height": 224, "width": 224}, size={"shortest_edge": 224},
    image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    do_center_crop=True, do_normalize=True, do_resize=True, do_rescale=True, resample=3,
)


def new_scheduler(sampler: str = "euler") -> EulerDiscreteScheduler | AnimateLCMSVDScheduler:
    """The scheduler of a variant's `sampler` (`Variant.sampler`), as its authors configure it."""
    if sampler == "animatelcm":
        return AnimateLCMSVDScheduler(**TURBO_SCHEDULER_CONFIG)
    return EulerDiscreteScheduler(**SCHEDULER_CONFIG)


def build_demo(num_frames: int, seed: int = 0, sampler: str = "euler") -> dict:
    """Tiny SVD parts (about 2 M parameters). Heads are kept wide (32 channels each) because
    torch's CPU attention is very slow with tiny head sizes."""
    # Random init draws from the global generator: fix it so a rebuild gives the same model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNetSpatioTemporalConditionModel(
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            block_out_channels=(32, 64), addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24, layers_per_block=1, cross_attention_dim=32,
            num_attention_heads=(1, 2), num_frames=num_frames,
        )
        vae = AutoencoderKLTemporalDecoder(
            block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
            layers_per_block=1, latent_channels=4, sample_size=256,
        )
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
            num_attention_heads=1, image_size=224, patch_size=32, hidden_act="gelu",
        ))
    return _with_processors(sampler, unet=unet, vae=vae, image_encoder=image_encoder)


def build_synthetic(num_frames: int, device: str | torch.device = "cuda",
                    dtype: torch.dtype = torch.float16, seed: int = 0,
                    sampler: str = "euler") -> dict:
    """Full-size SVD parts with random weights, built directly on `device`."""
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNetSpatioTemporalConditionModel(num_frames=num_frames)
        vae = AutoencoderKLTemporalDecoder(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            layers_per_block=2, latent_channels=4, sample_size=768,
        )
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1280, intermediate_size=5120, projection_dim=1024, num_hidden_layers=32,
            num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu",
        ))
    # Move every module: a buffer in the UNet's time mixer is created on the CPU otherwise.
    parts = dict(unet=unet, vae=vae, image_encoder=image_encoder)
    parts = {k: m.to(device, dtype).eval() for k, m in parts.items()}
    return _with_processors(sampler, **parts)


def _with_processors(sampler: str, **models) -> dict:
    for m in models.values():
        m.eval().requires_grad_(False)
    return dict(
        **models,
        scheduler=new_scheduler(sampler),
        feature_extractor=CLIPImageProcessorPil(**FEATURE_EXTRACTOR_CONFIG),
    )
