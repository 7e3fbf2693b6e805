"""BentoSVD's HTTP edge: `POST /generate` turns one image into an MP4.

Two BentoML services: `SVD` (the API: validates, decodes and sizes the upload, bounds the
queue, answers errors) calls `GenerationWorker` (holds the model on the GPU, one generation
at a time, stops a generation whose deadline passed or whose caller left, encodes the
video). `bentoml serve service:svc` serves both.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import secrets
import threading
import time
from dataclasses import asdict
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

import aiohttp
import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException, ServiceUnavailable
from bentoml.validators import ContentType
from starlette.responses import JSONResponse, Response

from bentosvd.errors import InvalidParams, PayloadTooLarge, RequestError
from bentosvd.images import decode_upload
from bentosvd.pipeline import GenerationSettings, Speedups, VideoGenerator
from bentosvd.video import encode_mp4
from config import MAX_SEED, Params, get_settings
from model_store import find_models
from request_guard import ClientGone, RequestGuard

# Under "bentoml." so that BentoML's logging set-up shows its INFO lines with the rest.
logger = logging.getLogger("bentoml.svd")
settings = get_settings()
variant = settings.variant
variant_model, image_encoder_model = find_models(settings)
NOISE_WARNING = "demo model: tiny random weights, the video is noise"

queue_depth = bentoml.metrics.Gauge(
    name="svd_queue_depth", documentation="Requests waiting for a GPU worker",
    multiprocess_mode="livesum")
in_flight = bentoml.metrics.Gauge(
    name="svd_in_flight", documentation="Generations running on GPU workers",
    multiprocess_mode="livesum")
rejected = bentoml.metrics.Counter(
    name="svd_rejected", documentation="Requests refused with 429 because the queue was full")


class GenerationTimeout(BentoMLException):
    """The request's deadline passed; its generation was stopped."""

    error_code = HTTPStatus.GATEWAY_TIMEOUT


class Stopped(Exception):
    """Raised between denoising steps to stop a generation nobody is waiting for."""


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
    # BentoML shows every worker all the GPUs of the service; each worker takes its own.
    resources={"gpu": settings.gpu_workers},
    workers=settings.gpu_workers,
    traffic={"timeout": settings.timeout},
)
class GenerationWorker:
    """Holds the SVD pipeline on one device and runs one generation at a time."""

    variant_model = bentoml.models.BentoModel(variant_model)
    image_encoder_model = bentoml.models.BentoModel(image_encoder_model)

    def __init__(self) -> None:
        import torch

        worker_index = bentoml.server_context.worker_index or 1
        device = settings.device
        if device == "auto":
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
            # Compile now so /readyz turns 200 only once a request will not stall for minutes.
            for orientation in settings.warmup:
                w, h = (variant.width, variant.height)[:: 1 if orientation == "landscape" else -1]
                self.generator.generate(np.zeros((h, w, 3), np.uint8), warmup_job(variant))
            logger.info("warmed up")
        if variant.name == "demo":
            logger.warning(NOISE_WARNING)
        # The pipeline is not thread-safe, and one GPU runs one generation well.
        self.lock = threading.Lock()
        self.faults_in_a_row = 0
        self.injected_faults = settings.inject_faults

    @bentoml.api
    async def generate(self, image: np.ndarray, job: dict, fps: int, deadline: float,
                       ctx: bentoml.Context) -> bytes:
        """Frames for `job`, encoded as MP4 at `fps`; stops once `deadline` (epoch seconds)
        passes or the caller disconnects."""
        caller_gone = threading.Event()
        watcher = asyncio.create_task(self._watch_disconnect(ctx.request, caller_gone))
        try:
            frames = await asyncio.to_thread(
                self._generate, image, GenerationSettings(**job), deadline, caller_gone)
        finally:
            watcher.cancel()
        return await asyncio.to_thread(encode_mp4, frames, fps, crf=settings.video_crf)

    @bentoml.api
    async def health(self) -> dict:
        """Faults in a row; the API's /livez fails past the limit so the pod is restarted."""
        return {"faults_in_a_row": self.faults_in_a_row,
                "alive": self.faults_in_a_row < settings.max_faults_in_a_row}

    @staticmethod
    async def _watch_disconnect(request, caller_gone: threading.Event) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        caller_gone.set()

    def _generate(self, image, job: GenerationSettings, deadline: float,
                  caller_gone: threading.Event) -> np.ndarray:
        def check(step: int = 0, total: int = 0) -> None:
            if caller_gone.is_set():
                raise Stopped(f"the caller disconnected (step {step}/{total})")
            if time.time() > deadline:
                raise Stopped(f"the deadline passed (step {step}/{total})")
            if self.injected_faults > 0:  # tests: a GPU fault in the middle of a generation
                self.injected_faults -= 1
                raise _out_of_memory_error()("injected CUDA out of memory")

        with self.lock:
            try:
                check()  # the caller may have left while this request waited for the GPU
                in_flight.inc()
                try:
                    frames = self.generator.generate(image, job, on_step=check)
                finally:
                    in_flight.dec()
            except Stopped as e:
                logger.info("generation stopped: %s", e)
                raise GenerationTimeout(f"generation stopped: {e}") from None
            except _out_of_memory_error() as e:
                self.faults_in_a_row += 1
                self._free_gpu_memory()
                logger.error("GPU out of memory (%d in a row): %s", self.faults_in_a_row, e)
                raise ServiceUnavailable("the GPU ran out of memory; try again") from None
        self.faults_in_a_row = 0
        return frames

    def _free_gpu_memory(self) -> None:
        # The failed step's tensors are garbage once its frames are gone; hand their
        # blocks back to the driver so the next request starts from a clean pool.
        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _out_of_memory_error() -> type[Exception]:
    import torch

    return torch.cuda.OutOfMemoryError


def error_response(status: int, message: str, *, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Client Closed Request"
    return JSONResponse({"error": phrase, "message": message}, status_code=status, headers=headers)


@bentoml.service(name="svd-service", traffic={"timeout": settings.timeout})
class SVD:
    """The API: checks the request, sizes the image, answers with the video or an error."""

    worker = bentoml.depends(GenerationWorker)

    def __init__(self) -> None:
        self.pending = 0  # requests admitted and not answered: running plus queued
        self.capacity = settings.gpu_workers + settings.max_queue
        self.recent_seconds = 0.0  # moving average of generation times, for Retry-After

    @bentoml.api(route="/generate")
    async def generate(
        self, ctx: bentoml.Context, img: Path, params: Params = Params()
    ) -> Annotated[Path, ContentType("video/mp4")]:
        """Turn one image into an MP4 (H.264). The seed used comes back in `X-Seed`."""
        response = await self._generate(ctx.request, img, params)
        # With a Context parameter BentoML sets the status from ctx.response, not ours.
        ctx.response.status_code = response.status_code
        return response

    async def _generate(self, request, img: Path, params: Params) -> Response:
        deadline = time.time() + settings.timeout - 1  # ours fires before BentoML's own
        try:
            image = await asyncio.to_thread(self._read_image, img)
            job = self._job(params)
        except RequestError as e:
            return JSONResponse(e.to_json(), status_code=e.status_code)
        if self.pending >= self.capacity:
            rejected.inc()
            return error_response(
                429, f"{self.pending} requests are running or queued (the limit is "
                f"{self.capacity}); try again later", retry_after=self._retry_after())
        self.pending += 1
        queue_depth.set(max(0, self.pending - settings.gpu_workers))
        started = time.monotonic()
        try:
            video = await self._until_disconnect(request, self._call_worker(
                image=image, job=asdict(job), fps=params.fps_id + 1, deadline=deadline))
        except ClientGone:
            logger.info("the client disconnected; its generation was cancelled")
            return error_response(499, "client closed the request")
        except GenerationTimeout:
            return error_response(504, f"the video was not ready within {settings.timeout} s; "
                                  "its generation was stopped")
        except ServiceUnavailable:
            return error_response(503, "the GPU ran out of memory on this request; its memory "
                                  "was freed, try again", retry_after=self._retry_after())
        finally:
            self.pending -= 1
            queue_depth.set(max(0, self.pending - settings.gpu_workers))
        self._record(time.monotonic() - started)
        headers = {"X-Seed": str(job.seed), "X-Model": variant.name,
                   "Content-Disposition": 'inline; filename="generated_video.mp4"'}
        if variant.name == "demo":
            headers["X-Model-Warning"] = NOISE_WARNING
        return Response(video, media_type="video/mp4", headers=headers)

    async def __is_alive__(self) -> bool:
        try:
            health = await self.worker.to_async.health()
        except Exception:  # a worker being restarted is not a dead API service
            return True
        return health["alive"]

    @staticmethod
    async def _until_disconnect(request, call):
        """Await `call`, cancelling it if the client goes away: closing the connection to
        the worker tells the worker to stop at its next step."""
        task = asyncio.ensure_future(call)
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ClientGone()

    def _record(self, seconds: float) -> None:
        self.recent_seconds = seconds if not self.recent_seconds else 0.8 * self.recent_seconds + 0.2 * seconds

    def _retry_after(self) -> int:
        """Seconds until a place is likely free: one generation's time per queued request
        ahead, shared by the workers (at least 1)."""
        per_request = self.recent_seconds or 10.0
        return max(1, math.ceil(per_request * max(1, self.pending) / settings.gpu_workers))

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


# Checks the form before BentoML reads it: one uploaded `img` file (a URL string would make
# BentoML download it), at most one `params`, nothing else, a bounded body. The extra 64 KiB
# is the form around an image of exactly MAX_UPLOAD_BYTES.
SVD.add_asgi_middleware(RequestGuard, path="/generate",
                        max_body_bytes=settings.max_upload_bytes + 64 * 1024)

svc = SVD
