"""A generation request on the API side, from admission to the answer.

`admit` checks and sizes the upload and plans the generation (4xx otherwise), and takes a
place in the queue (429 past MAX_QUEUE); `run` waits there for a GPU worker, streams the
generation from it and leaves the outcome in the `Job`; `answer` turns the job into the
HTTP answer: the video with its headers, or the JSON error.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from starlette.responses import Response

from bentosvd import metrics
from bentosvd.api.dispatch import Dispatcher, Full, RecentDuration
from bentosvd.api.jobs import MAX_ATTEMPTS, DatabaseUnavailable, Job, JobStore
from bentosvd.api.planning import choose_format, interpolation_header, plan_generation
from bentosvd.api.webhooks import Webhooks, WebhookSpec
from bentosvd.api.worker_client import GenerationFailed, WorkerClient, WorkerGone
from bentosvd.config import DEMO_WARNING, Params, Settings, Variant
from bentosvd.errors import PayloadTooLarge, ServiceError, error_response
from bentosvd.media.formats import FORMATS
from bentosvd.media.images import decode_upload
from bentosvd.protocol import Generated, GenerationSettings, OutputSpec, Started, Step
from bentosvd.weights import rife_models

logger = logging.getLogger("bentoml.svd")

JOB_HEARTBEAT = 0.5  # seconds between renewals of this replica's jobs (and cancel checks)
JOB_PRUNE_EVERY = 60  # seconds between clean-ups of finished jobs past their retention


def served_url() -> str | None:
    """Where `bentoml serve` serves this service, as its own "listening on" line says it
    (a bind to 0.0.0.0 or :: shown as localhost, which a browser on that machine opens):
    from the map of service addresses BentoML hands each of its processes. None outside
    `bentoml serve`."""
    from bentoml._internal.context import server_context

    try:
        urls = json.loads(os.environ.get("BENTOML_RUNNER_MAP") or "{}")
    except ValueError:
        return None
    url = urls.get(server_context.service_name) if isinstance(urls, dict) else None
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return None
    scheme, _, netloc = url.rstrip("/").partition("://")
    host, _, port = netloc.rpartition(":")
    if ":" in host and not host.startswith("["):  # an IPv6 address: bracketed in a URL
        netloc = f"[{host}]:{port}"
    return f"{scheme}://{netloc}"


def ready_line(health: list[dict], url: str | None) -> str:
    """The one line logged at ready, for every GPU worker at once (their `health`): the
    model, the devices, the speed-ups and warmed shapes (each worker's, where they differ),
    and the full address of the web page and of BentoML's API docs (at /)."""

    def each(show) -> str:
        values = [show(h) for h in health]
        if len(set(values)) == 1:
            return values[0]
        return "; ".join(f"worker {i}: {value}" for i, value in enumerate(values))

    devices = ", ".join(str(h.get("device")) for h in health)
    if len(health) > 1:
        devices += f" ({len(health)} GPU workers)"
    speedups = each(lambda h: str(h.get("speedups")))
    shapes = each(lambda h: ", ".join(f"{k} {v}" for k, v in (h.get("shapes") or {}).items())
                  or "none warmed")
    base = url or ""
    return (f"ready: {health[0].get('model')} on {devices}, speed-ups: {speedups}, shapes: "
            f"{shapes}; the web page is at {base}/ui/, the API docs at {base}/")


@dataclass
class Work:
    """What an admitted job's GPU worker is to do."""

    image: np.ndarray
    job: GenerationSettings
    output: OutputSpec
    params: Params
    deadline: float  # epoch seconds


class Generations:
    """The API service's generations: the queue for the GPU workers, the async jobs and the
    calls to the workers (`workers[i]`: BentoML's handle of GPU worker i)."""

    def __init__(self, settings: Settings, variant: Variant, workers: list):
        self.settings, self.variant = settings, variant
        self.dispatcher = Dispatcher(settings.gpu_workers, settings.max_queue,
                                     on_change=metrics.queue_depth.set)
        self.recent = RecentDuration()
        self.jobs = JobStore(settings.jobs_dir, settings.jobs_database_url, ttl=settings.job_ttl,
                             max_finished=settings.max_finished_jobs,
                             max_bytes=settings.max_job_bytes, lease=settings.job_lease)
        self.client = WorkerClient(workers, timeout=settings.timeout, retry_after=self.retry_after)
        self.webhooks = Webhooks(settings.webhook_allowed_hosts, settings.webhook_secret,
                                 max_attempts=settings.webhook_max_attempts)
        # The RIFE model the workers load (the default interpolation), if one is registered.
        self.rife = rife_models.find(settings.rife_model)
        self.silent_since: dict[int, float] = {}  # worker -> when it first left /livez unanswered
        self._keeper: asyncio.Task | None = None
        self._announced = False  # the one line at ready

    # ------------------------------------------------------------------ the async jobs

    async def start(self) -> None:
        """Open the job store, and keep this replica's jobs alive from now on: renew their
        heartbeat, stop those cancelled at another replica, take over those of dead ones."""
        await self.jobs.open()
        self._keeper = asyncio.create_task(self._keep_jobs())

    async def stop(self) -> None:
        """At shutdown: jobs not finished go back to the store for the next start (or
        another replica), as they were, their attempt not counted."""
        if self._keeper is not None:
            self._keeper.cancel()
        await self.jobs.put_back()
        await self.webhooks.close()
        tasks = [job.task for job in list(self.jobs.local.values())
                 if job.task is not None and not job.task.done()]
        for task in tasks:  # their workers stop at the next step
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        self.jobs.close()

    async def _keep_jobs(self) -> None:
        claimed_once, pruned = False, time.monotonic()
        while True:
            try:
                for job_id in await self.jobs.heartbeat():
                    job = self.jobs.local.get(job_id)
                    if job is not None and job.task is not None and not job.task.done():
                        logger.info("job %s was cancelled at another replica", job_id)
                        job.task.cancel()
                # Take jobs over only once the workers answer: a restarted server loads first.
                if claimed_once or await self._workers_answer():
                    # The only server on its SQLite file takes every unfinished job at once.
                    everyone = not claimed_once and not self.jobs.db.postgres
                    for job, request, image in await self.jobs.claim_orphans(everyone):
                        await self._resume(job, request, image)
                    claimed_once = True
                if time.monotonic() - pruned > JOB_PRUNE_EVERY:
                    await self.jobs.prune()
                    pruned = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the database away for a while: try again next beat
                logger.warning("could not keep the async jobs: %s", e)
            await asyncio.sleep(JOB_HEARTBEAT)

    async def _workers_answer(self) -> bool:
        """Whether every worker answers (loaded); the first time, the one line at ready."""
        try:
            health = await asyncio.gather(*(self.client.health(i)
                                            for i in range(self.settings.gpu_workers)))
        except Exception:
            return False
        if not self._announced:  # this replica's API process: once per start, for all workers
            self._announced = True
            logger.info("%s", ready_line(health, served_url()))
        return True

    async def _resume(self, job: Job, request: dict, image: np.ndarray | None) -> None:
        """Run a job taken over from a dead replica (or this server before a restart)."""
        self.jobs.local[job.id] = job
        if image is None:
            job.fail(ServiceError(
                f"the job was interrupted {job.attempt - 1} times (a server restart or a crashed "
                "worker) and is not run again", status=503, error="Interrupted",
                fix="submit it again", request_id=job.id))
            await self.jobs.finish(job)
            return
        logger.info("job %s taken over, attempt %d", job.id, job.attempt)
        params = Params(**request["params"])
        job.ticket = self.dispatcher.enter(force=True)  # accepted before: never refused now
        job.work = Work(image, GenerationSettings(**request["job"]), OutputSpec(**request["output"]),
                        params, time.time() + self.settings.timeout - 1)
        job.task = asyncio.create_task(self.run(job))

    async def generate(self, request, img: Path, params: Params, *,
                       client_waits: bool = True) -> Response:
        """Admit, run and answer one request. A client that leaves cancels its generation;
        `client_waits=False` for a BentoML task, whose request was stored, with no client."""
        try:
            job = await self.admit(request, img, params)
        except ServiceError as e:
            return error_response(e)
        task = asyncio.ensure_future(self.run(job))
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if client_waits and not task.done() and await request.is_disconnected():
                task.cancel()  # the worker is told to stop at its next step
                await asyncio.wait({task})
                logger.info("the client disconnected; its generation was cancelled")
        return self.answer(job)

    async def submit(self, request, img: Path, params: Params,
                     webhook: WebhookSpec | None = None) -> Job:
        """Admit a request as an async job that runs on while its id is answered; it is
        recorded first, so that a restart or another replica finds it."""
        if webhook is not None:
            await asyncio.to_thread(self.webhooks.validate, webhook)  # may resolve a name
        job = await self.admit(request, img, params)
        work = job.work
        job.webhook = webhook.model_dump() if webhook is not None else None
        record = {"params": params.model_dump(mode="json"), "job": work.job.model_dump(mode="json"),
                  "output": work.output.model_dump(mode="json"), "webhook": job.webhook}
        try:
            await self.jobs.add(job, record, work.image)
        except DatabaseUnavailable as e:
            job.ticket.leave()
            raise ServiceError(f"{e}; the job was not accepted", status=503,
                               retry_after=self.retry_after()) from None
        job.task = asyncio.create_task(self.run(job))
        self.webhooks.notify(job.id, job.webhook, "queued", job.to_json())
        return job

    async def admit(self, request, img: Path, params: Params) -> Job:
        """Check and size the upload and take a place in the queue, or raise the 4xx."""
        image = await asyncio.to_thread(self._read_image, img, params)
        fmt = choose_format(params, request.headers.get("accept"))
        job_settings, output = plan_generation(params, self.variant, fmt, rife=self.rife is not None)
        try:
            ticket = self.dispatcher.enter()
        except Full as e:
            metrics.rejected.inc()
            raise ServiceError(f"{e}; try again later", status=429,
                               retry_after=self.retry_after()) from None
        deadline = time.time() + self.settings.timeout - 1  # ours fires before BentoML's own
        return Job(seed=job_settings.seed, format=fmt, total_steps=job_settings.num_inference_steps,
                   ticket=ticket, work=Work(image, job_settings, output, params, deadline),
                   interpolation=interpolation_header(output))

    async def run(self, job: Job) -> None:
        """Wait for a worker, generate, and leave the outcome in `job` (and, for an async
        job, in the job store). An async job whose worker died runs once more."""
        stored = job.id in self.jobs.local
        try:
            while True:
                await self._run_once(job, stored)
                if not (stored and isinstance(job.error, WorkerGone) and job.attempt < MAX_ATTEMPTS):
                    break
                job.attempt += 1
                logger.warning("job %s: its worker went away; attempt %d", job.id, job.attempt)
                job.status, job.step, job.error, job.finished_at = "queued", 0, None, None
                job.ticket, job.work = self.dispatcher.enter(force=True), work_again(job, self.settings)
                await self.jobs.attempted(job)
        finally:
            if stored and job.finished:
                await asyncio.shield(self.jobs.finish(job))
                event = {"succeeded": "completed"}.get(job.status, job.status)
                self.webhooks.notify(job.id, job.webhook, event, job.to_json())

    async def _run_once(self, job: Job, stored: bool) -> None:
        ticket, work, started = job.ticket, job.work, time.monotonic()
        job.last_work = work

        def on_event(event) -> None:
            if isinstance(event, Started):
                job.status = "running"
            elif isinstance(event, Step):
                job.step = event.step
            elif isinstance(event, Generated):  # the worker's GPU is free while it encodes
                ticket.leave()
            if stored and isinstance(event, (Started, Step)):
                self.jobs.progressed(job)
                self.webhooks.notify(job.id, job.webhook, "progress", job.to_json())

        try:
            index = await ticket.wait()
            job.timings["queue_wait"] = time.monotonic() - started
            metrics.queue_wait_seconds.observe(job.timings["queue_wait"])
            done = await self.client.generate(
                index, request_id=job.id, image=work.image, job=work.job, output=work.output,
                deadline=work.deadline, on_event=on_event)
        except asyncio.CancelledError:
            job.fail(GenerationFailed("the generation was cancelled", status=499,
                                      request_id=job.id))
            raise
        except GenerationFailed as e:
            job.fail(e)
        except Exception as e:  # a bug on this side: the request still gets its answer
            logger.exception("request %s failed", job.id)
            job.fail(ServiceError(f"the server failed on request {job.id} ({type(e).__name__}); "
                                  "its log has the details", status=500, request_id=job.id))
        else:
            self.recent.record(time.monotonic() - started)
            job.timings.update(done.timings)
            job.succeed(base64.b64decode(done.video), FORMATS[job.format].media_type)
            self._observe(index, job, work.params, done.gpu_peak_bytes)
        finally:
            ticket.leave()

    def answer(self, job: Job, video: bytes | None = None) -> Response:
        """The finished job as the HTTP answer: the video (`job.video` unless given), or
        the error."""
        if job.status != "succeeded":
            return error_response(job.error)
        video = job.video if video is None else video
        fmt = FORMATS[job.format]
        headers = {"X-Seed": str(job.seed), "X-Model": self.variant.name, "X-Request-Id": job.id,
                   "Server-Timing": server_timing(job.timings),
                   "Content-Disposition": f'inline; filename="generated_video{fmt.extension}"'}
        if self.variant.demo:
            headers["X-Model-Warning"] = DEMO_WARNING
        if job.interpolation:
            headers["X-Interpolation"] = job.interpolation
        return Response(video, media_type=fmt.media_type, headers=headers)

    async def workers_state(self) -> list[dict]:
        """Each worker's device, speed-ups, WARMUP shapes (`{"landscape": "compiled",
        "portrait": "compiling"}`) and RIFE model (None: minterpolate only), or
        `{"loading": true}` while it does not answer."""
        async def one(index: int) -> dict:
            try:
                health = await self.client.health(index)
            except Exception:
                return {"loading": True}
            return {k: health.get(k) for k in ("device", "speedups", "shapes", "rife")}
        return list(await asyncio.gather(*(one(i) for i in range(self.settings.gpu_workers))))

    async def alive(self) -> bool:
        """For /livez: every worker is alive."""
        alive = await asyncio.gather(*(self._alive(i) for i in range(self.settings.gpu_workers)))
        return all(alive)

    async def _alive(self, index: int) -> bool:
        """Worker `index` is alive unless it says it is not (faults in a row) or has not
        answered for WORKER_SILENT_LIMIT seconds. A worker loading its model (at start, or
        restarted after a crash) holds its event loop and answers nothing until it is done,
        minutes with a cold compile: that is not dead, and /livez does not wait for it."""
        try:
            health = await self.client.health(index)
        except Exception as e:
            silent_since = self.silent_since.setdefault(index, time.monotonic())
            silent = time.monotonic() - silent_since
            if silent > self.settings.worker_silent_limit:
                logger.error("GPU worker %d has not answered for %.0f s (%r): not alive",
                             index, silent, e)
                return False
            return True
        self.silent_since.pop(index, None)
        return health["alive"]

    def retry_after(self) -> int:
        return self.recent.retry_after(self.dispatcher.running + self.dispatcher.waiting,
                                       self.settings.gpu_workers)

    @staticmethod
    def _observe(index: int, job: Job, params: Params, peak_bytes: int | None) -> None:
        for phase, seconds in job.timings.items():
            if phase != "queue_wait":
                metrics.phase_seconds.labels(phase=phase).observe(seconds)
        if peak_bytes is not None:
            metrics.gpu_peak_bytes.labels(worker=str(index)).set(peak_bytes)
        logger.info("generated %s", json.dumps({
            "request_id": job.id, "worker": index, "params": params.model_dump(),
            "seed": job.seed, "format": job.format,
            "seconds": {k: round(v, 3) for k, v in job.timings.items()},
            "gpu_peak_bytes": peak_bytes}))

    def _read_image(self, img: Path, params: Params) -> np.ndarray:
        limits = self.settings
        try:
            size = img.stat().st_size
            if size > limits.max_upload_bytes:
                raise PayloadTooLarge(
                    f"the image is {size} bytes; the limit is {limits.max_upload_bytes}",
                    field="img", fix="send a smaller image (it is resized to the model's size anyway)")
            return decode_upload(
                img, (self.variant.width, self.variant.height), sizing=params.sizing,
                orientation=params.orientation, max_pixels=limits.max_image_pixels,
                max_aspect=limits.max_aspect_ratio, min_side=limits.min_image_side)
        finally:
            img.unlink(missing_ok=True)  # users' images do not stay on the server's disk


def server_timing(timings: dict) -> str:
    """The phases as an HTTP Server-Timing header (durations in milliseconds)."""
    return ", ".join(f"{phase};dur={seconds * 1000:.1f}" for phase, seconds in timings.items())


def work_again(job: Job, settings: Settings) -> Work:
    """The same work for another attempt, with a deadline of its own."""
    work = job.last_work
    return Work(work.image, work.job, work.output, work.params, time.time() + settings.timeout - 1)
