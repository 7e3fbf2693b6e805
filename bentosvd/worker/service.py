"""The GPU side of BentoSVD: `GenerationWorker`, one BentoML service per GPU.

Each holds an `Engine` (bentosvd/worker/engine.py: the SVD pipeline on its device,
compiled before `/readyz` turns 200, one generation at a time), streams its progress to
the API service (`service.py` at the repository root), stops a generation whose deadline
passed or whose caller left, and encodes the video once the GPU is free for the next
request.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator
from pathlib import Path

import bentoml
import numpy as np

from bentosvd.config import DEMO_WARNING, get_settings
from bentosvd.metrics import in_flight
from bentosvd.protocol import (
    Done,
    Failed,
    FailureKind,
    Generated,
    GenerationSettings,
    OutputSpec,
    frame,
)
from bentosvd.weights import rife_models
from bentosvd.weights.store import find_models

# While the worker encodes one video (FFmpeg threads) it already generates the next. On a CPU
# device, torch's OpenMP threads by default spin for a while after each parallel region and
# take the cores the encoder needs, slowing the denoising many times over on a small
# machine; with PASSIVE they sleep at once (docs/journal.md, 2026-11-28, OMP_WAIT_POLICY).
# Unloaded it is as fast either way, and on a GPU torch's own CPU threads barely run. It must
# be set before torch loads, which is in GenerationWorker's import of the engine; a value
# set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Under "bentoml." so that BentoML's logging set-up shows its INFO lines with the rest.
logger = logging.getLogger("bentoml.svd")


class _NoTorchvisionNotice(logging.Filter):
    """diffusers' SVD pipeline imports transformers' CLIPImageProcessor, which without
    torchvision (not a dependency) falls back to the PIL one, the one used anyway, and says
    so at every start: a warning nobody can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())
settings = get_settings()
if settings.low_memory:
    # Memory freed by one model's offload is reused by the next instead of staying reserved
    # in blocks of the wrong size: what the process holds stays near what it uses.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
variant = settings.variant
variant_model, image_encoder_model = find_models(settings)
_rife = rife_models.find(settings.rife_model)  # frame interpolation, when one is registered

class GenerationWorker:
    """Holds the SVD pipeline on one device and runs one generation at a time.

    `generate` streams the events of `bentosvd.protocol`, one JSON line each."""

    index = 0  # which worker service this is (one per GPU); set by `worker_service`
    variant_model = bentoml.models.BentoModel(variant_model)
    image_encoder_model = bentoml.models.BentoModel(image_encoder_model)
    if _rife is not None:  # declared so that `bentoml build` puts it in the Bento
        rife_model = bentoml.models.BentoModel(str(_rife.tag))

    def __init__(self) -> None:
        # Here, not at the top: only the worker process needs torch and diffusers.
        started = time.perf_counter()
        from bentosvd.worker.engine import Engine
        logger.info("imported torch and diffusers in %.1f s", time.perf_counter() - started)
        delays = settings.inject_load_delay  # tests: a load slow enough to miss probes
        time.sleep(delays[min(self.index, len(delays) - 1)] if delays else 0)

        self.engine = Engine(
            settings, variant, str(self.variant_model.tag),
            Path(self.variant_model.path) / "pipeline",
            Path(self.image_encoder_model.path) / "image_encoder",
            index=self.index, busy_gauge=in_flight,
            rife=(str(self.rife_model.tag), self.rife_model.path) if _rife is not None else None)
        if variant.demo:
            logger.warning(DEMO_WARNING)
        self.cancels: dict[str, threading.Event] = {}  # request id -> set it to stop

    @bentoml.api
    async def generate(self, request_id: str, image: np.ndarray, job: GenerationSettings,
                       output: OutputSpec, deadline: float) -> AsyncGenerator[str, None]:
        """Frames for `job`, encoded as `output` says, with progress on the way; stops
        once `deadline` (epoch seconds) passes, the caller goes away or
        `cancel(request_id)` is called."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[str] = asyncio.Queue()
        # Encodes the frames as they are decoded, in a thread of its own.
        encoder = self.engine.encoder(job, image, output)
        interpolation = self.engine.interpolation(job, output)
        caller_gone = self.cancels[request_id] = threading.Event()

        def report(event) -> None:  # from the generation's thread
            loop.call_soon_threadsafe(events.put_nowait, frame(event))

        work = asyncio.ensure_future(asyncio.to_thread(
            self.engine.run, image, job, deadline, caller_gone, report, encoder.add,
            request_id=request_id, interpolation=interpolation))
        try:
            while not (work.done() and events.empty()):
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            result = work.result()
            if isinstance(result, Failed):
                yield frame(result)
                return
            # The encoder has had the frames chunk by chunk, and the GPU is free: the API
            # may send the next request, whose generation then overlaps this encode.
            yield frame(Generated())
            started = time.perf_counter()
            try:
                # The request's deadline covers its encode too: an encode that does not
                # finish (FFmpeg stuck in its thread) fails the request, not holds it.
                video = await asyncio.wait_for(asyncio.to_thread(encoder.result),
                                               timeout=max(0.0, deadline - time.time()))
            except TimeoutError:
                logger.error("request %s: the video encode did not finish by the request's "
                             "deadline; the request fails with a timeout", request_id)
                yield frame(Failed(kind=FailureKind.TIMEOUT,
                                   message="the video was not encoded before the request's deadline"))
                return
            # What the request waited for after decoding; the rest overlapped it.
            timings = {**result.timings, "video_encode": time.perf_counter() - started}
            yield frame(Done(video=base64.b64encode(video).decode(), timings=timings,
                             gpu_peak_bytes=result.gpu_peak_bytes))
        finally:
            # Reached early when the caller closes the stream: stop at the next step.
            caller_gone.set()
            encoder.close()  # after a failure or a departure: the encode stops too
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
        return {"faults_in_a_row": self.engine.faults_in_a_row, "alive": self.engine.alive,
                "shapes": dict(self.engine.shapes), **self.engine.description}


def worker_service(index: int):
    """The BentoML service of GPU worker `index`: one GPU each (a pair with
    CFG_PARALLEL=2), so BentoML hands every worker its own (and BentoCloud can place them
    apart)."""
    name = "GenerationWorker" if index == 0 else f"GenerationWorker{index + 1}"
    cls = type(name, (GenerationWorker,), {"index": index, "__doc__": GenerationWorker.__doc__})
    return bentoml.service(name=name, resources={"gpu": settings.cfg_parallel},
                           traffic={"timeout": settings.timeout})(cls)


WORKERS = [worker_service(i) for i in range(settings.gpu_workers)]
