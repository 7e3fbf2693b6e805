"""From a request's `params` to what the GPU worker does: the generation settings (the
variant's reference values where a param is left out) and how the video is encoded.
Params that disagree with the model or with each other raise InvalidParams (400)."""

from __future__ import annotations

import secrets

from bentosvd.config import MAX_SEED, Params, Variant
from bentosvd.errors import InvalidParams
from bentosvd.media.formats import FORMATS, MAX_INTERPOLATED_FPS
from bentosvd.protocol import GenerationSettings, OutputSpec


def choose_format(params: Params, accept: str | None) -> str:
    """params.format, else the first of our media types the Accept header names, else mp4."""
    if params.format is not None:
        return params.format
    by_type = {f.media_type: name for name, f in FORMATS.items()}
    for item in (accept or "").split(","):
        media_type = item.split(";")[0].strip().lower()
        if media_type in by_type:
            return by_type[media_type]
    return "mp4"


def interpolation_header(output: OutputSpec) -> str | None:
    """What was done to the frame rate, for the X-Interpolation header: `rife 7->14 fps`."""
    if not output.interpolate_fps:
        return None
    return f"{output.interpolation} {output.fps}->{output.interpolate_fps} fps"


def plan_generation(params: Params, variant: Variant, fmt: str, *,
                    rife: bool = False) -> tuple[GenerationSettings, OutputSpec]:
    """What the worker generates, and how it encodes the frames; `rife`: whether the
    server has a RIFE model (the default interpolation then)."""
    frames = params.num_frames or variant.num_frames
    low = variant.min_guidance_scale if params.min_guidance_scale is None else params.min_guidance_scale
    high = variant.max_guidance_scale if params.max_guidance_scale is None else params.max_guidance_scale
    steps = params.num_inference_steps or variant.num_inference_steps
    fps = params.fps_id + 1
    problems = [
        (frames > variant.num_frames, "params.num_frames",
         f"num_frames is {frames} but {variant.name} makes at most {variant.num_frames}",
         f"use 2 to {variant.num_frames}"),
        (steps > variant.max_inference_steps, "params.num_inference_steps",
         f"num_inference_steps is {steps} but {variant.name} takes at most "
         f"{variant.max_inference_steps}", f"use 1 to {variant.max_inference_steps}"),
        (params.decoding_t > frames, "params.decoding_t",
         f"decoding_t is {params.decoding_t} but the video has {frames} frames",
         f"use 1 to {frames}"),
        (low > high, "params.max_guidance_scale",
         f"max_guidance_scale ({high}) is below min_guidance_scale ({low})",
         "make max_guidance_scale at least min_guidance_scale"),
        (params.interpolate_fps is not None and params.interpolate_fps <= fps,
         "params.interpolate_fps",
         f"interpolate_fps ({params.interpolate_fps}) must be above the video's {fps} fps",
         f"use {fps + 1} to {MAX_INTERPOLATED_FPS}, or null"),
        ((FORMATS[fmt].max_fps or 10**6) < (params.interpolate_fps or fps), "params.format",
         f"{fmt} plays at most {FORMATS[fmt].max_fps} fps",
         "lower interpolate_fps or pick mp4/webm/webp"),
        (params.interpolation is not None and params.interpolate_fps is None,
         "params.interpolation", f"interpolation is {params.interpolation!r} but "
         "interpolate_fps is not set", f"set interpolate_fps ({fps + 1} to "
         f"{MAX_INTERPOLATED_FPS}), or drop interpolation"),
        (params.interpolation == "rife" and not rife, "params.interpolation",
         "this server has no RIFE model registered",
         "use interpolation \"minterpolate\", or have the operator register one "
         "(python import_model.py --rife-file flownet.pkl)"),
    ]
    for bad, field, message, fix in problems:
        if bad:
            raise InvalidParams(message, field=field, fix=fix)
    job = GenerationSettings(
        num_frames=frames,
        num_inference_steps=steps,
        min_guidance_scale=low, max_guidance_scale=high,
        fps=fps, motion_bucket_id=(variant.motion_bucket_id if params.motion_bucket_id is None
                                   else params.motion_bucket_id),
        noise_aug_strength=params.cond_aug, decode_chunk_size=params.decoding_t,
        seed=secrets.randbelow(MAX_SEED + 1) if params.seed is None else params.seed,
    )
    output = OutputSpec(format=fmt, fps=fps, boomerang=params.boomerang,
                        interpolate_fps=params.interpolate_fps,
                        interpolation=params.interpolation or ("rife" if rife else "minterpolate"))
    return job, output
