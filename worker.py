"""The GPU side of BentoSVD: `GenerationWorker`, one BentoML service per GPU.

Each holds the SVD pipeline on its device, compiles it before `/readyz` turns 200, runs one
generation at a time, streams its progress to the API service (`service.py`), stops a
generation whose deadline passed or whose caller left, and encodes the video once the GPU
is free for the next request.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import replace
from pathlib import Path

import bentoml
import numpy as np
import torch

from bentosvd.pipeline import GenerationSettings, Speedups, VideoGenerator
from bentosvd.video import boomerang, encode_video, interpolate
from config import get_settings
from model_store import find_models

# Under "bentoml." so that BentoML's logging set-up shows its INFO lines with the rest.
logger = logging.getLogger("bentoml.svd")
settings = get_settings()
variant = settings.variant
variant_model, image_encoder_model = find_models(settings)
NOISE_WARNING = "demo model: tiny random weights, the video is noise"

in_flight = bentoml.metrics.Gauge(
    name="svd_in_flight", documentation="Generations running on GPU workers",
    multiprocess_mode="livesum")

class Stopped(Exception):
    """Raised between denoising steps to stop a generation nobody is waiting for."""


def speedups_for(settings, device: str) -> Speedups:
    on_gpu = device.startswith("cuda")
    if settings.low_memory:
        return Speedups(low_memory=True)
    if settings.fast_path if settings.fast_path is not None else on_gpu:
        # Set before torch.compile first reads it: a restart reuses the compiled kernels.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.expanduser(settings.compile_cache_dir))
        return replace(Speedups.fast(), fp8=settings.fp8)
    return Speedups(fp8=settings.fp8)


def warmup_job(variant) -> GenerationSettings:
    return GenerationSettings(
        num_frames=variant.num_frames, num_inference_steps=2, min_guidance_scale=1.0,
        max_guidance_scale=2.0, fps=7, motion_bucket_id=127, noise_aug_strength=0.02,
        decode_chunk_size=1, seed=0,
    )


def pick_device(index: int) -> str:
    """Worker `index`'s device. BentoML gives each worker service a GPU of its own (it sets
    CUDA_VISIBLE_DEVICES); with BENTOML_DISABLE_GPU_ALLOCATION each sees all and takes its own."""
    if settings.device != "auto":
        return settings.device
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{index % torch.cuda.device_count()}"


def encode_output(frames: np.ndarray, output: dict) -> bytes:
    """Frames → the bytes of output["format"] at output["fps"], first interpolated to
    output["interpolate_fps"] and played as a boomerang if asked."""
    fps = output["fps"]
    if output.get("interpolate_fps"):
        frames, fps = interpolate(frames, fps, output["interpolate_fps"]), output["interpolate_fps"]
    if output.get("boomerang"):
        frames = boomerang(frames)
    return encode_video(frames, fps, output["format"], crf=settings.video_crf)  # gif/webp ignore crf


def event_line(**event) -> str:
    """One event of a worker's stream: a line of JSON (the stream may arrive in any chunks)."""
    return json.dumps(event) + "\n"


class GenerationWorker:
    """Holds the SVD pipeline on one device and runs one generation at a time.

    `generate` streams lines of JSON: {"event": "started"} once the GPU is its,
    {"event": "step", "step": i, "total": n} after each denoising step, then either
    {"event": "generated"} (the GPU is free again; the video is being encoded) and
    {"event": "done", "video": <base64>, "timings": {...}}, or {"event": "error",
    "kind": "timeout" | "gpu_oom", "message": ...}.
    """

    index = 0  # which worker service this is (one per GPU); set by `worker_service`
    variant_model = bentoml.models.BentoModel(variant_model)
    image_encoder_model = bentoml.models.BentoModel(image_encoder_model)

    def __init__(self) -> None:
        device = pick_device(self.index)
        speedups = speedups_for(settings, device)
        self.on_gpu = device.startswith("cuda")
        self.generator = VideoGenerator.load(
            Path(self.variant_model.path) / "pipeline",
            Path(self.image_encoder_model.path) / "image_encoder",
            device=device, dtype=settings.dtype, speedups=speedups,
        )
        logger.info("loaded %s (%s) on %s with %s", self.variant_model.tag, variant.description,
                    device, speedups)
        if speedups.compile_unet:
            # Compile now so /readyz turns 200 only once a request will not stall for minutes;
            # other shapes (num_frames, orientation) then run eagerly instead of compiling.
            shapes = set()
            for orientation in settings.warmup:
                w, h = (variant.width, variant.height)[:: 1 if orientation == "landscape" else -1]
                self.generator.generate(np.zeros((h, w, 3), np.uint8), warmup_job(variant))
                shapes.add((variant.num_frames, h, w))
            self.generator.compiled_shapes = shapes
            logger.info("warmed up: %s", ", ".join(settings.warmup))
        if variant.name == "demo":
            logger.warning(NOISE_WARNING)
        # The pipeline is not thread-safe, and one GPU runs one generation well. The API
        # sends the next request once this one's frames are made (its video may still be
        # encoding); the lock holds even if something else calls.
        self.lock = threading.Lock()
        self.faults_in_a_row = 0
        self.injected_faults = settings.inject_faults
        self.cancels: dict[str, threading.Event] = {}  # request id -> set it to stop

    @bentoml.api
    async def generate(self, request_id: str, image: np.ndarray, job: dict, output: dict,
                       deadline: float) -> AsyncGenerator[str, None]:
        """Frames for `job`, encoded as `output` says (see `encode_output`), with progress on
        the way; stops once `deadline` (epoch seconds) passes, the caller goes away or
        `cancel(request_id)` is called."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[str] = asyncio.Queue()
        caller_gone = self.cancels[request_id] = threading.Event()

        def report(**event) -> None:  # from the generation's thread
            loop.call_soon_threadsafe(events.put_nowait, event_line(**event))

        work = asyncio.ensure_future(asyncio.to_thread(
            self._generate, image, GenerationSettings(**job), deadline, caller_gone, report))
        try:
            while not (work.done() and events.empty()):
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            result = work.result()
            if "frames" in result:
                frames, timings = result.pop("frames"), result["timings"]
                # The GPU is free: the API may send the next request, whose generation then
                # overlaps this encode.
                yield event_line(event="generated")
                started = time.perf_counter()
                video = await asyncio.to_thread(encode_output, frames, output)
                timings["video_encode"] = time.perf_counter() - started
                result["video"] = base64.b64encode(video).decode()
            yield event_line(**result)
        finally:
            # Reached early when the caller closes the stream: stop at the next step.
            caller_gone.set()
            self.cancels.pop(request_id, None)

    @bentoml.api
    async def cancel(self, request_id: str) -> bool:
        """Stop `request_id`'s generation at its next denoising step (False: not here)."""
        gone = self.cancels.get(request_id)
        if gone is not None:
            gone.set()
        return gone is not None

    @bentoml.api
    async def health(self) -> dict:
        """Faults in a row; the API's /livez fails past the limit so the pod is restarted."""
        return {"faults_in_a_row": self.faults_in_a_row,
                "alive": self.faults_in_a_row < settings.max_faults_in_a_row}

    def _generate(self, image, job: GenerationSettings, deadline: float,
                  caller_gone: threading.Event, report) -> dict:
        def check(step: int = 0, total: int = 0) -> None:
            if caller_gone.is_set():
                raise Stopped(f"the caller disconnected (step {step}/{total})")
            if time.time() > deadline:
                raise Stopped(f"the deadline passed (step {step}/{total})")
            if self.injected_faults > 0:  # tests: a GPU fault in the middle of a generation
                self.injected_faults -= 1
                raise torch.cuda.OutOfMemoryError("injected CUDA out of memory")
            if step:
                report(event="step", step=step, total=total)

        arrived = time.perf_counter()
        with self.lock:
            timings = {"gpu_wait": time.perf_counter() - arrived}
            try:
                check()  # the caller may have left while this request waited for the GPU
                report(event="started")
                in_flight.inc()
                if self.on_gpu:
                    torch.cuda.reset_peak_memory_stats(self.generator.device)
                try:
                    frames = self.generator.generate(image, job, on_step=check, timings=timings)
                finally:
                    in_flight.dec()
            except Stopped as e:
                logger.info("generation stopped: %s", e)
                return {"event": "error", "kind": "timeout", "message": f"generation stopped: {e}"}
            except torch.cuda.OutOfMemoryError as e:
                self.faults_in_a_row += 1
                self._free_gpu_memory()
                logger.error("GPU out of memory (%d in a row): %s", self.faults_in_a_row, e)
                return {"event": "error", "kind": "gpu_oom", "message": str(e)[:500]}
        self.faults_in_a_row = 0
        peak = torch.cuda.max_memory_allocated(self.generator.device) if self.on_gpu else None
        return {"event": "done", "frames": frames, "timings": timings, "gpu_peak_bytes": peak}

    def _free_gpu_memory(self) -> None:
        # The failed step's tensors are garbage once its frames are gone; hand their
        # blocks back to the driver so the next request starts from a clean pool.
        gc.collect()
        if self.on_gpu:
            torch.cuda.empty_cache()


def worker_service(index: int):
    """The BentoML service of GPU worker `index`: one GPU each, so BentoML hands every
    worker its own (and BentoCloud can place them apart)."""
    name = "GenerationWorker" if index == 0 else f"GenerationWorker{index + 1}"
    cls = type(name, (GenerationWorker,), {"index": index, "__doc__": GenerationWorker.__doc__})
    return bentoml.service(name=name, resources={"gpu": 1},
                           traffic={"timeout": settings.timeout})(cls)


WORKERS = [worker_service(i) for i in range(settings.gpu_workers)]
