"""BentoSVD's HTTP edge: `POST /generate` turns one image into an MP4.

Two BentoML services: `SVD` (the API: validates, decodes and sizes the upload, answers
errors) calls `GenerationWorker` (holds the model on the GPU, one generation at a time,
encodes the video). `bentoml serve service:svc` serves both.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import aiohttp
import bentoml
import numpy as np
from bentoml.validators import ContentType
from starlette.responses import JSONResponse, Response

from bentosvd.errors import InvalidParams, PayloadTooLarge, RequestError
from bentosvd.images import decode_upload
from bentosvd.pipeline import GenerationSettings, Speedups, VideoGenerator
from bentosvd.video import encode_mp4
from config import MAX_SEED, Params, get_settings
from model_store import find_models

logger = logging.getLogger("bentosvd")
settings = get_settings()
variant = settings.variant
variant_model, image_encoder_model = find_models(settings)
NOISE_WARNING = "demo model: tiny random weights, the video is noise"


def speedups_for(settings, device: str) -> Speedups:
    on_gpu = device.startswith("cuda")
    if settings.low_memory:
        return Speedups(low_memory=True)
    if settings.fast_path if settings.fast_path is not None else on_gpu:
        # Set before torch.compile first reads it: a restart reuses the compiled kernels.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.expanduser(settings.compile_cache_dir))
        return Speedups.fast()
    return Speedups()


def warmup_job(variant) -> GenerationSettings:
    return GenerationSettings(
        num_frames=variant.num_frames, num_inference_steps=2, min_guidance_scale=1.0,
        max_guidance_scale=2.0, fps=7, motion_bucket_id=127, noise_aug_strength=0.02,
        decode_chunk_size=1, seed=0,
    )


@bentoml.service(
    name="GenerationWorker",
    resources={"gpu": 1},
    workers=settings.gpu_workers,
    traffic={"timeout": settings.timeout},
)
class GenerationWorker:
    """Holds the SVD pipeline on one device and runs one generation at a time."""

    variant_model = bentoml.models.BentoModel(variant_model)
    image_encoder_model = bentoml.models.BentoModel(image_encoder_model)

    def __init__(self) -> None:
        worker_index = bentoml.server_context.worker_index or 1
        device = settings.device
        if device == "auto":
            import torch

            # With workers=N every worker sees all N GPUs; each takes its own.
            device = f"cuda:{worker_index - 1}" if torch.cuda.is_available() else "cpu"
        speedups = speedups_for(settings, device)
        self.generator = VideoGenerator.load(
            Path(self.variant_model.path) / "pipeline",
            Path(self.image_encoder_model.path) / "image_encoder",
            device=device, dtype=settings.dtype, speedups=speedups,
        )
        logger.info("loaded %s (%s) on %s with %s", self.variant_model.tag, variant.description,
                    device, speedups)
        if speedups.compile_unet:
            # Compile now, for both orientations, so /readyz turns 200 only once the
            # first real request will not stall for minutes.
            for orientation in settings.warmup:
                w, h = (variant.width, variant.height)[:: 1 if orientation == "landscape" else -1]
                self.generator.generate(np.zeros((h, w, 3), np.uint8), warmup_job(variant))
            logger.info("warmed up")
        # The pipeline is not thread-safe and one GPU runs one generation well.
        self.lock = asyncio.Lock()
        if variant.name == "demo":
            logger.warning(NOISE_WARNING)

    @bentoml.api
    async def generate(self, image: np.ndarray, job: dict, fps: int) -> bytes:
        async with self.lock:
            frames = await asyncio.to_thread(self.generator.generate, image, GenerationSettings(**job))
        return await asyncio.to_thread(encode_mp4, frames, fps, crf=settings.video_crf)


@bentoml.service(name="svd-service", traffic={"timeout": settings.timeout})
class SVD:
    """The API: checks the request, sizes the image, answers with the video or an error."""

    worker = bentoml.depends(GenerationWorker)

    @bentoml.api(route="/generate")
    async def generate(
        self, img: Path, params: Params = Params()
    ) -> Annotated[Path, ContentType("video/mp4")]:
        """Turn one image into an MP4 (H.264). The seed used comes back in `X-Seed`."""
        try:
            image = await asyncio.to_thread(self._read_image, img)
            job = self._job(params)
        except RequestError as e:
            return JSONResponse(e.to_json(), status_code=e.status_code)
        video = await self._call_worker(image=image, job=asdict(job), fps=params.fps_id + 1)
        headers = {"X-Seed": str(job.seed), "X-Model": variant.name,
                   "Content-Disposition": 'inline; filename="generated_video.mp4"'}
        if variant.name == "demo":
            headers["X-Model-Warning"] = NOISE_WARNING
        return Response(video, media_type="video/mp4", headers=headers)

    @staticmethod
    def _read_image(img: Path) -> np.ndarray:
        try:
            size = img.stat().st_size
            if size > settings.max_upload_bytes:
                raise PayloadTooLarge(
                    f"the image is {size} bytes; the limit is {settings.max_upload_bytes}",
                    field="img", fix="send a smaller image (it is resized to the model's size anyway)",
                )
            return decode_upload(
                img, (variant.width, variant.height), max_pixels=settings.max_image_pixels,
                max_aspect=settings.max_aspect_ratio, min_side=settings.min_image_side,
            )
        finally:
            img.unlink(missing_ok=True)  # users' images do not stay on the server's disk

    @staticmethod
    def _job(params: Params) -> GenerationSettings:
        if params.decoding_t > variant.num_frames:
            raise InvalidParams(
                f"decoding_t is {params.decoding_t} but {variant.name} makes "
                f"{variant.num_frames} frames", field="params.decoding_t",
                fix=f"use 1 to {variant.num_frames}",
            )
        return GenerationSettings(
            num_frames=variant.num_frames, num_inference_steps=variant.num_inference_steps,
            min_guidance_scale=variant.min_guidance_scale,
            max_guidance_scale=variant.max_guidance_scale,
            fps=params.fps_id + 1, motion_bucket_id=params.motion_bucket_id,
            noise_aug_strength=params.cond_aug, decode_chunk_size=params.decoding_t,
            seed=secrets.randbelow(MAX_SEED + 1) if params.seed is None else params.seed,
        )

    async def _call_worker(self, **kwargs) -> bytes:
        try:
            return await self.worker.to_async.generate(**kwargs)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            # The worker closes idle connections after 5 s while the client pool keeps
            # them for 15 s (BentoML issue #4971); the request never reached the worker,
            # so sending it once more is safe.
            logger.info("worker connection was stale; retrying once")
            return await self.worker.to_async.generate(**kwargs)


svc = SVD
