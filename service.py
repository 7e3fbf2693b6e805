"""BentoSVD's HTTP edge: `POST /generate` turns one image into an MP4.

`SVD`, the API service, validates, decodes and sizes the upload, queues requests first
come first served and hands each to a free `GenerationWorker` (worker.py: one service per
GPU), follows its progress, and answers with the video, a job to poll, or a JSON error.
`bentoml serve service:svc` serves them all.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import aiohttp
import bentoml
import numpy as np
from bentoml.validators import ContentType
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.staticfiles import StaticFiles

from bentosvd.dispatch import Dispatcher, Full, Lines, RecentDuration
from bentosvd.errors import PayloadTooLarge, RequestError, error_response, phrase
from bentosvd.images import decode_upload
from bentosvd.jobs import Job, JobStore
from bentosvd.plan import choose_format, plan_generation
from bentosvd.video import FORMATS
from config import Params
from request_guard import AnswerErrors, ClientGone, JsonField, RequestGuard
from worker import NOISE_WARNING, WORKERS, logger, settings, variant

queue_depth = bentoml.metrics.Gauge(
    name="svd_queue_depth", documentation="Requests waiting for a GPU worker",
    multiprocess_mode="livesum")
rejected = bentoml.metrics.Counter(
    name="svd_rejected", documentation="Requests refused with 429 because the queue was full")
phase_seconds = bentoml.metrics.Histogram(
    name="svd_phase_seconds", documentation="Seconds per phase of a generation",
    labelnames=["phase"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300))
queue_wait_seconds = bentoml.metrics.Histogram(
    name="svd_queue_wait_seconds", documentation="Seconds a request waited for a GPU worker",
    buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300))
gpu_peak_bytes = bentoml.metrics.Gauge(
    name="svd_gpu_memory_peak_bytes", documentation="Peak GPU memory of the last generation",
    labelnames=["worker"], multiprocess_mode="mostrecent")


HEALTH_TIMEOUT = 5  # seconds /livez waits for a worker's health before taking it as loading

CURRENT: dict = {}  # "api": the SVD instance of this process, once created


class WorkerError(Exception):
    """A generation ended without a video: the HTTP status and JSON body for the client."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after
        self.body = {"error": phrase(status), "message": message}


class Refused(Exception):
    """The request is not admitted; `response` says why."""

    def __init__(self, response: JSONResponse):
        super().__init__(response.status_code)
        self.response = response


@bentoml.service(name="svd-service", traffic={"timeout": settings.timeout})
class SVD:
    """The API: checks the request, sizes the image, queues it for a GPU worker, answers
    with the video (`POST /generate`) or a job to follow (`POST /jobs`)."""

    # One dependency per GPU worker service: worker0, worker1, ...
    for _i, _worker in enumerate(WORKERS):
        locals()[f"worker{_i}"] = bentoml.depends(_worker)
    del _i, _worker

    def __init__(self) -> None:
        self.dispatcher = Dispatcher(settings.gpu_workers, settings.max_queue,
                                     on_change=queue_depth.set)
        self.recent = RecentDuration()
        self.silent_since: dict[int, float] = {}  # worker -> when it first left /livez unanswered
        self.jobs = JobStore(ttl=settings.job_ttl, max_finished=settings.max_finished_jobs)
        CURRENT["api"] = self  # for the plain Starlette routes below (GET /jobs/<id>, /info)

    @property
    def workers(self) -> list:
        return [getattr(self, f"worker{i}") for i in range(settings.gpu_workers)]

    @bentoml.api(route="/generate")
    async def generate(
        self, ctx: bentoml.Context, img: Path, params: Params = Params()
    ) -> Annotated[Path, ContentType("video/mp4")]:
        """Turn one image into a video (MP4 unless `format` or the Accept header asks for
        WebM, GIF or WebP). The seed used comes back in `X-Seed`."""
        response = await self._generate(ctx.request, img, params)
        # With a Context parameter BentoML sets the status from ctx.response, not ours.
        ctx.response.status_code = response.status_code
        return response

    @bentoml.api(route="/jobs")
    async def submit_job(self, ctx: bentoml.Context, img: Path, params: Params = Params()) -> dict:
        """Queue a generation and answer at once (202) with its id: follow it at
        `GET /jobs/<id>` (status, queue position, step i of N), fetch the video from
        `GET /jobs/<id>/result`, stop it with `DELETE /jobs/<id>`."""
        try:
            job, work = await self._admit(ctx.request, img, params)
        except Refused as e:
            response = e.response
        else:
            self.jobs.add(job)
            job.task = asyncio.create_task(self._run(job, *work))
            response = JSONResponse(job.to_json(), status_code=202,
                                    headers={"Location": f"/jobs/{job.id}"})
        ctx.response.status_code = response.status_code
        return response

    async def _generate(self, request, img: Path, params: Params) -> Response:
        try:
            job, work = await self._admit(request, img, params)
        except Refused as e:
            return e.response
        try:
            await self._until_disconnect(request, self._run(job, *work))
        except ClientGone:
            logger.info("the client disconnected; its generation was cancelled")
        return self._answer(job)

    def _answer(self, job: Job) -> Response:
        """The finished job as the HTTP answer: the video, or the error."""
        if job.status != "succeeded":
            return error_response(job.error_status, job.error, retry_after=job.retry_after)
        fmt = FORMATS[job.format]
        headers = {"X-Seed": str(job.seed), "X-Model": variant.name, "X-Request-Id": job.id,
                   "Server-Timing": server_timing(job.timings),
                   "Content-Disposition": f'inline; filename="generated_video{fmt.extension}"'}
        if variant.name == "demo":
            headers["X-Model-Warning"] = NOISE_WARNING
        return Response(job.video, media_type=fmt.media_type, headers=headers)

    async def _admit(self, request, img: Path, params: Params) -> tuple[Job, tuple]:
        """Check and size the upload and take a place in the queue: (job, its work), or
        Refused with the 4xx answer."""
        try:
            image = await asyncio.to_thread(self._read_image, img, params)
            fmt = choose_format(params, request.headers.get("accept"))
            settings_, output = plan_generation(params, variant, fmt)
        except RequestError as e:
            raise Refused(JSONResponse(e.to_json(), status_code=e.status_code)) from None
        try:
            ticket = self.dispatcher.enter()
        except Full as e:
            rejected.inc()
            raise Refused(error_response(429, f"{e}; try again later",
                                         retry_after=self._retry_after())) from None
        job = Job(seed=settings_.seed, format=fmt, total_steps=settings_.num_inference_steps,
                  ticket=ticket)
        deadline = time.time() + settings.timeout - 1  # ours fires before BentoML's own
        return job, (image, settings_, output, params, deadline)

    async def _run(self, job: Job, image, settings_, output: dict,
                   params: Params, deadline: float) -> None:
        """Wait for a worker, generate, and leave the outcome in `job`."""
        ticket, started = job.ticket, time.monotonic()

        def on_event(event: dict) -> None:
            if event["event"] == "started":
                job.status = "running"
            elif event["event"] == "step":
                job.step = event["step"]
            elif event["event"] == "generated":  # the worker's GPU is free while it encodes
                ticket.leave()

        try:
            index = await ticket.wait()
            job.timings["queue_wait"] = time.monotonic() - started
            queue_wait_seconds.observe(job.timings["queue_wait"])
            result = await self._call_worker(
                index, on_event, request_id=job.id, image=image, job=asdict(settings_),
                output=output, deadline=deadline)
        except asyncio.CancelledError:
            job.fail(499, {"error": phrase(499), "message": "the generation was cancelled"})
            raise
        except WorkerError as e:
            job.fail(e.status, e.body, e.retry_after)
        else:
            self.recent.record(time.monotonic() - started)
            job.timings.update(result["timings"])
            job.succeed(base64.b64decode(result["video"]), FORMATS[job.format].media_type)
            self._observe(index, job, params, result.get("gpu_peak_bytes"))
        finally:
            ticket.leave()

    async def __is_alive__(self) -> bool:
        alive = await asyncio.gather(*(self._alive(i) for i in range(settings.gpu_workers)))
        return all(alive)

    async def _alive(self, index: int) -> bool:
        """Worker `index` is alive unless it says it is not (GPU faults in a row) or has not
        answered for WORKER_SILENT_LIMIT seconds. A worker loading its model (at start, or
        restarted after a crash) holds its event loop and answers nothing until it is done,
        minutes with a cold compile: that is not dead, and /livez does not wait for it."""
        try:
            health = await asyncio.wait_for(self.workers[index].to_async.health(),
                                            HEALTH_TIMEOUT)
        except Exception as e:
            silent_since = self.silent_since.setdefault(index, time.monotonic())
            silent = time.monotonic() - silent_since
            if silent > settings.worker_silent_limit:
                logger.error("GPU worker %d has not answered for %.0f s (%r): not alive",
                             index, silent, e)
                return False
            return True
        self.silent_since.pop(index, None)
        return health["alive"]

    @staticmethod
    async def _until_disconnect(request, call):
        """Await `call`, cancelling it if the client goes away (the worker is then told
        to stop at its next step)."""
        task = asyncio.ensure_future(call)
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                await asyncio.wait({task})
                raise ClientGone()

    async def _call_worker(self, index: int, on_event=None, **kwargs) -> dict:
        """Run a generation on worker `index`; its "done" event, or WorkerError."""
        for attempt in (1, 2):
            received = False
            stream = self.workers[index].to_async.generate(**kwargs)
            try:
                lines = Lines()
                async for chunk in stream:
                    received = True
                    for line in lines.feed(chunk):
                        event = json.loads(line)
                        if event["event"] == "done":
                            return event
                        if event["event"] == "error":
                            raise self._worker_error(event, kwargs["request_id"])
                        if on_event is not None:
                            on_event(event)
            except asyncio.CancelledError:
                # The client left (or its job was cancelled): tell the worker to stop.
                asyncio.ensure_future(self._cancel(index, kwargs["request_id"]))
                raise
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                if received or attempt == 2:
                    raise WorkerError(503, "the GPU worker went away during the generation; "
                                      "try again", self._retry_after()) from None
                # The worker closes idle connections after 5 s while the client pool keeps
                # them for 15 s (BentoML issue #4971); the request never reached the worker,
                # so sending it once more is safe.
                logger.info("worker connection was stale; retrying once")
                continue
            finally:
                await stream.aclose()
            raise WorkerError(503, "the GPU worker ended the generation without a video; "
                              "try again", self._retry_after())

    async def _cancel(self, index: int, request_id: str) -> None:
        try:
            await self.workers[index].to_async.cancel(request_id=request_id)
        except Exception as e:  # the worker still stops at the deadline
            logger.warning("could not cancel %s on worker %d: %r", request_id, index, e)

    def _worker_error(self, event: dict, request_id: str) -> WorkerError:
        if event["kind"] == "timeout":
            return WorkerError(504, f"the video was not ready within {settings.timeout} s; "
                               "its generation was stopped")
        if event["kind"] == "internal":  # a bug: the same request would fail again
            return WorkerError(500, f"the GPU worker failed on request {request_id} "
                               f"({event['message']}); the server log has the details")
        return WorkerError(503, "the GPU ran out of memory on this request; its memory was "
                           "freed, try again", self._retry_after())

    def _retry_after(self) -> int:
        return self.recent.retry_after(self.dispatcher.running + self.dispatcher.waiting,
                                       settings.gpu_workers)

    @staticmethod
    def _observe(index: int, job: Job, params: Params, peak_bytes: int | None) -> None:
        for phase, seconds in job.timings.items():
            if phase != "queue_wait":
                phase_seconds.labels(phase=phase).observe(seconds)
        if peak_bytes is not None:
            gpu_peak_bytes.labels(worker=str(index)).set(peak_bytes)
        logger.info("generated %s", json.dumps({
            "request_id": job.id, "worker": index, "params": params.model_dump(),
            "seed": job.seed, "format": job.format,
            "seconds": {k: round(v, 3) for k, v in job.timings.items()},
            "gpu_peak_bytes": peak_bytes}))

    @staticmethod
    def _read_image(img: Path, params: Params) -> np.ndarray:
        try:
            size = img.stat().st_size
            if size > settings.max_upload_bytes:
                raise PayloadTooLarge(
                    f"the image is {size} bytes; the limit is {settings.max_upload_bytes}",
                    field="img", fix="send a smaller image (it is resized to the model's size anyway)",
                )
            return decode_upload(
                img, (variant.width, variant.height), sizing=params.sizing,
                orientation=params.orientation, max_pixels=settings.max_image_pixels,
                max_aspect=settings.max_aspect_ratio, min_side=settings.min_image_side,
            )
        finally:
            img.unlink(missing_ok=True)  # users' images do not stay on the server's disk


def server_timing(timings: dict) -> str:
    """The phases as an HTTP Server-Timing header (durations in milliseconds)."""
    return ", ".join(f"{phase};dur={seconds * 1000:.1f}" for phase, seconds in timings.items())


def info(request) -> JSONResponse:
    """GET /info: the model, its sizes, and every param's schema with the model's bounds."""
    schema = Params.model_json_schema()["properties"]
    for name, prop in schema.items():  # pydantic writes optionals as anyOf [..., null]
        for option in prop.pop("anyOf", []):
            if option.get("type") != "null":
                prop.update(option)
    schema["num_frames"]["maximum"] = variant.num_frames
    schema["decoding_t"]["maximum"] = variant.num_frames
    schema["num_inference_steps"]["default"] = variant.num_inference_steps
    schema["num_frames"]["default"] = variant.num_frames
    schema["min_guidance_scale"]["default"] = variant.min_guidance_scale
    schema["max_guidance_scale"]["default"] = variant.max_guidance_scale
    schema["format"]["default"] = "mp4"
    return JSONResponse({
        "model": variant.name, "description": variant.description,
        "warning": NOISE_WARNING if variant.name == "demo" else None,
        "width": variant.width, "height": variant.height, "num_frames": variant.num_frames,
        "num_inference_steps": variant.num_inference_steps, "formats": list(FORMATS),
        "params": schema,
    })


def _job_or_404(request) -> Job | JSONResponse:
    job = CURRENT["api"].jobs.get(request.path_params["job_id"])
    if job is None:
        return error_response(404, "no such job (finished jobs are kept for "
                              f"{settings.job_ttl} s, at most {settings.max_finished_jobs})")
    return job


async def job_status(request) -> JSONResponse:
    job = _job_or_404(request)
    return job if isinstance(job, JSONResponse) else JSONResponse(job.to_json())


async def job_result(request) -> Response:
    job = _job_or_404(request)
    if isinstance(job, JSONResponse):
        return job
    if job.status == "cancelled":
        return error_response(410, "the job was cancelled; it has no video")
    if not job.finished:
        return error_response(409, f"the job is {job.status} (step {job.step} of "
                              f"{job.total_steps}); poll /jobs/{job.id} until it has finished")
    return CURRENT["api"]._answer(job)


async def job_cancel(request) -> JSONResponse:
    """Cancel a queued or running job (its GPU work stops at the next step); a finished
    job is forgotten, with its video."""
    job = _job_or_404(request)
    if isinstance(job, JSONResponse):
        return job
    if job.task is not None and not job.finished:
        job.task.cancel()
        await asyncio.wait({job.task})
    else:
        CURRENT["api"].jobs.remove(job.id)
    return JSONResponse(job.to_json())


class PlainRoutes:
    """ASGI middleware for the GET/DELETE routes beside BentoML's POST APIs: a request that
    fully matches one of `routes` is answered here, anything else goes on to BentoML."""

    def __init__(self, app, routes: list[Route]):
        self.app, self.routes = app, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for route in self.routes:
                match, child_scope = route.matches(scope)
                if match == Match.FULL:
                    scope.update(child_scope)
                    return await route.handle(scope, receive, send)
        await self.app(scope, receive, send)


# The first added is the outermost.
SVD.add_asgi_middleware(AnswerErrors)
SVD.add_asgi_middleware(PlainRoutes, routes=[
    Route("/info", info, methods=["GET"]),
    Route("/jobs/{job_id}", job_status, methods=["GET"]),
    Route("/jobs/{job_id}", job_cancel, methods=["DELETE"]),
    Route("/jobs/{job_id}/result", job_result, methods=["GET"]),
])
# The web page: static files, index.html at /ui/.
SVD.mount_asgi_app(StaticFiles(directory=Path(__file__).parent / "bentosvd" / "ui", html=True),
                   path="/ui")

# Checks the form before BentoML reads it: one uploaded `img` file (a URL string would make
# BentoML download it), at most one `params` of bounded size, depth and numbers, nothing
# else, a bounded body. The extra 64 KiB is the form around an image of MAX_UPLOAD_BYTES.
_params = JsonField(Params, max_bytes=settings.max_params_bytes,
                    max_depth=settings.max_params_depth, max_digits=settings.max_number_digits)
for _path in ("/generate", "/jobs"):
    SVD.add_asgi_middleware(RequestGuard, path=_path, json_fields={"params": _params},
                            max_body_bytes=settings.max_upload_bytes + 64 * 1024)

svc = SVD
