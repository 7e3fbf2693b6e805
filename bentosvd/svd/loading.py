"""Loading SVD's parts from the model store's folders and saving them in the diffusers
layout the hub repos use."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
# The PIL image processor: what transformers falls back to without torchvision (not a
# dependency), named directly so that no start logs a warning about it.
from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

from bentosvd.svd.turbo_sampler import AnimateLCMSVDScheduler

# Folders inside the variant's model directory; the image encoder has a model of its own.
PIPELINE_PARTS = ("unet", "vae", "scheduler", "feature_extractor")
# The schedulers a variant's scheduler_config.json may name (`_class_name`): SVD's Euler, or
# the turbo variants' AnimateLCM sampler, whose config the import writes.
SCHEDULERS = {cls.__name__: cls for cls in (EulerDiscreteScheduler, AnimateLCMSVDScheduler)}


def resolve_device(device: str = "auto", index: int = 0) -> torch.device:
    """`device`, or for "auto" the CUDA GPU of worker `index` if there is one, else the CPU.
    BentoML gives each worker service a GPU of its own (CUDA_VISIBLE_DEVICES); with
    BENTOML_DISABLE_GPU_ALLOCATION every worker sees all of them and takes its own."""
    if device != "auto":
        return torch.device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{index % torch.cuda.device_count()}")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # CPUs have slow or missing half-precision kernels.
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def save_parts(parts: dict, pipeline_dir: Path, image_encoder_dir: Path, *, fp16_files: bool) -> None:
    """Write the pipeline's parts in the diffusers layout the hub repos use:
    `pipeline_dir/{unet,vae,scheduler,feature_extractor}` and the encoder in `image_encoder_dir`."""
    variant = "fp16" if fp16_files else None
    for name in ("unet", "vae"):
        parts[name].save_pretrained(pipeline_dir / name, variant=variant)
    parts["scheduler"].save_pretrained(pipeline_dir / "scheduler")
    parts["feature_extractor"].save_pretrained(pipeline_dir / "feature_extractor")
    # transformers names its files itself (model.safetensors); the dtype is in the weights.
    parts["image_encoder"].save_pretrained(image_encoder_dir)


def weights_variant(folder: Path) -> str | None:
    """`fp16` when the folder holds diffusers' `*.fp16.safetensors` files, else None."""
    return "fp16" if any(folder.glob("*.fp16.safetensors")) else None


def load_parts(pipeline_dir: Path, image_encoder_dir: Path, device: torch.device,
               dtype: torch.dtype) -> dict:
    """Load the parts saved by `save_parts` (or placed by the hub download) onto `device`.
    Into CPU memory first, then copied: reading the files straight onto the GPU
    (device_map) was no faster (docs/journal.md, 2026-11-27)."""
    pipeline_dir, image_encoder_dir = Path(pipeline_dir), Path(image_encoder_dir)
    # Loading takes a second or two from a local store: a progress bar per part in the
    # server's log says nothing the "loaded ... in N s" line does not.
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    # The vae is either SVD's temporal decoder or, for *_image_decoder, a frame-wise
    # AutoencoderKL; the scheduler Euler or the turbo's: each config names its class.
    vae_class = _class_name(pipeline_dir / "vae" / "config.json")
    models = {
        "unet": (UNetSpatioTemporalConditionModel, pipeline_dir / "unet"),
        "vae": (getattr(diffusers, vae_class), pipeline_dir / "vae"),
        "image_encoder": (CLIPVisionModelWithProjection, image_encoder_dir),
    }
    parts = {}
    for name, (cls, folder) in models.items():
        model = cls.from_pretrained(folder, variant=weights_variant(folder), torch_dtype=dtype)
        parts[name] = model.to(device).eval().requires_grad_(False)
    scheduler_class = SCHEDULERS[_class_name(pipeline_dir / "scheduler" / "scheduler_config.json")]
    parts["scheduler"] = scheduler_class.from_pretrained(pipeline_dir / "scheduler")
    parts["feature_extractor"] = CLIPImageProcessorPil.from_pretrained(pipeline_dir / "feature_extractor")
    return parts


def _class_name(config: Path) -> str:
    return json.loads(config.read_text())["_class_name"]
