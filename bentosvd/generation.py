"""What a generation is asked to do, apart from the image: kept free of torch and diffusers,
so the API service and `bentoml serve`'s own process, which plan generations but never run
one, start without importing them (a restart is timed to /readyz)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides a video besides the image. Field names are diffusers'."""

    num_frames: int
    num_inference_steps: int
    min_guidance_scale: float
    max_guidance_scale: float
    fps: int  # the conditioning value diffusers takes: it subtracts 1 again internally
    motion_bucket_id: int
    noise_aug_strength: float
    decode_chunk_size: int
    seed: int
