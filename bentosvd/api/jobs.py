"""Async jobs: what a submitted generation is doing, and its result once done, kept where a
restart or another replica finds them.

A `Job` is created when a request is admitted and is updated as its generation moves
(queued → running, step i of N → succeeded / failed / cancelled). `POST /generate` waits
for its job (kept in memory only); `POST /jobs` hands back the job's id at once and
`JobStore` records the job: its row in the job database (bentosvd/api/job_database.py), its
input image and then its video as files in JOBS_DIR. `GET /jobs/<id>` and
`GET /jobs/<id>/result` read those, from any replica that shares the database and the
folder.

A job whose replica died while it was queued or running (its heartbeat stopped) is
claimed by a live replica, or by the same server once restarted, and run once more with
the same input and seed (`attempt: 2`); interrupted a second time, it fails with an error
that says so. Finished jobs are kept `ttl` seconds, at most `max_finished` of them and
`max_bytes` of videos (the oldest go first).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bentosvd.api.job_database import DatabaseUnavailable, JobDatabase
from bentosvd.api.planning import interpolation_header
from bentosvd.errors import ServiceError
from bentosvd.media.formats import FORMATS
from bentosvd.protocol import OutputSpec

logger = logging.getLogger("bentoml.svd")

FINISHED = ("succeeded", "failed", "cancelled")
MAX_ATTEMPTS = 2  # a job interrupted by a crash runs once more, not forever


@dataclass
class Job:
    seed: int
    format: str
    total_steps: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: str = "queued"  # queued, running, succeeded, failed, cancelled
    step: int = 0
    attempt: int = 1
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    video: bytes | None = None  # in memory until answered (POST /generate) or written
    media_type: str | None = None
    error: ServiceError | None = None  # the answer the client gets
    timings: dict = field(default_factory=dict)
    work: object | None = None  # what the GPU worker is to do, until it has been sent
    ticket: object | None = None  # the dispatcher's Ticket while waiting / running
    task: asyncio.Task | None = None  # the generation, for async jobs
    last_work: object | None = None  # the work of the last attempt, for another one
    webhook: dict | None = None  # WebhookSpec's fields, when the job asked for webhooks
    queue_position: int | None = None  # as last recorded, for a job run by another replica
    interpolation: str | None = None  # X-Interpolation: what was done to the frame rate

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def succeed(self, video: bytes, media_type: str) -> None:
        self.video, self.media_type = video, media_type
        self._finish("succeeded")

    def fail(self, error: ServiceError) -> None:
        self.error = error
        self._finish("cancelled" if error.status_code == 499 else "failed")

    def _finish(self, status: str) -> None:
        self.status, self.finished_at, self.ticket, self.work = status, time.time(), None, None

    @property
    def position(self) -> int | None:
        if self.status != "queued":
            return None
        if self.ticket is not None:
            return self.ticket.position
        return self.queue_position

    def to_json(self) -> dict:
        return {
            "id": self.id, "status": self.status, "queue_position": self.position,
            "step": self.step, "total_steps": self.total_steps, "seed": self.seed,
            "format": self.format, "attempt": self.attempt,
            "error": self.error and self.error.to_json(),
            "created_at": self.created_at, "finished_at": self.finished_at,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "status_url": f"/jobs/{self.id}", "result_url": f"/jobs/{self.id}/result",
        }


def _error_from(stored: str | None) -> ServiceError | None:
    if not stored:
        return None
    body = json.loads(stored)
    return ServiceError(body["message"], status=body.pop("status"), field=body.get("field"),
                        fix=body.get("fix"), request_id=body.get("request_id"),
                        error=body.get("error"))


def _error_to(error: ServiceError | None) -> str | None:
    return json.dumps({**error.to_json(), "status": error.status_code}) if error else None


class JobStore:
    """The async jobs of every replica sharing `database_url` and `folder`; this replica's
    own unfinished jobs are also held in memory (`local`), where their progress is."""

    def __init__(self, folder: str | Path, database_url: str | None, *, ttl: float,
                 max_finished: int, max_bytes: int, lease: float):
        self.folder = Path(folder).expanduser()
        self.db = JobDatabase(database_url, self.folder)
        self.ttl, self.max_finished, self.max_bytes, self.lease = ttl, max_finished, max_bytes, lease
        # Who runs a job: this process, as long as it lives.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.local: dict[str, Job] = {}
        # One thread for the database, so that its calls run in the order they were made.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="job-db")
        self._last_step_write: dict[str, float] = {}
        self.closing = False  # shutting down: what jobs were doing is left as put back

    async def _db(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, lambda: fn(*args, **kwargs))

    def _later(self, fn, *args, **kwargs) -> None:
        """Write without waiting (progress): in order with every other call."""
        future = self._thread.submit(fn, *args, **kwargs)
        future.add_done_callback(_log_failure)

    # ------------------------------------------------------------------ files

    def _input_path(self, job_id: str) -> Path:
        return self.folder / "inputs" / f"{job_id}.npy"

    def video_path(self, job_id: str, fmt: str) -> Path:
        return self.folder / "videos" / f"{job_id}{FORMATS[fmt].extension}"

    def _remove_files(self, job_id: str, fmt: str | None) -> None:
        self._input_path(job_id).unlink(missing_ok=True)
        if fmt in FORMATS:
            self.video_path(job_id, fmt).unlink(missing_ok=True)

    # ------------------------------------------------------------------ life cycle

    async def open(self) -> None:
        (self.folder / "inputs").mkdir(parents=True, exist_ok=True)
        (self.folder / "videos").mkdir(parents=True, exist_ok=True)
        await self._db(self.db.create_table)
        await self.prune()
        logger.info("async jobs kept in %s, files in %s", self.db.where, self.folder)

    async def add(self, job: Job, request: dict, image: np.ndarray) -> None:
        """Record an admitted job (raises DatabaseUnavailable: the caller answers 503)."""
        def write():
            path = self._input_path(job.id)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, image)
            os.replace(tmp, path)
            self.db.insert(dict(
                id=job.id, status=job.status, step=0, total_steps=job.total_steps,
                seed=job.seed, format=job.format, request=json.dumps(request),
                attempt=job.attempt, owner=self.owner, heartbeat=time.time(),
                created_at=job.created_at))
        await self._db(write)
        self.local[job.id] = job

    def progressed(self, job: Job) -> None:
        """The job started or took a step: recorded, steps at most twice a second."""
        now = time.monotonic()
        if job.status == "running" and job.step and job.step < job.total_steps and \
                now - self._last_step_write.get(job.id, 0) < 0.5:
            return
        self._last_step_write[job.id] = now
        self._later(self.db.update, job.id, self.owner, status=job.status, step=job.step,
                    queue_position=None)

    async def attempted(self, job: Job) -> None:
        """The job is queued again for another attempt (its worker died)."""
        await self._db(self.db.update, job.id, self.owner, status=job.status, step=0,
                       attempt=job.attempt)

    async def put_back(self) -> None:
        """At shutdown: this replica's unfinished jobs are left for the next start or
        another replica to take over at once, the attempt in flight not counted."""
        def put_back():
            for job in list(self.local.values()):
                if not job.finished:
                    self.db.update(job.id, self.owner, status="queued", step=0,
                                   attempt=job.attempt - 1, heartbeat=0.0)
        self.closing = True
        await self._db(put_back)

    async def finish(self, job: Job) -> None:
        """Record a finished job and write its video beside the database; the job then
        lives there only."""
        def write():
            size = None
            if job.video is not None:
                path = self.video_path(job.id, job.format)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_bytes(job.video)
                os.replace(tmp, path)
                size = len(job.video)
            self._input_path(job.id).unlink(missing_ok=True)
            kept = self.db.update(
                job.id, self.owner, status=job.status, step=job.step, finished_at=job.finished_at,
                error=_error_to(job.error), timings=job.timings, media_type=job.media_type,
                video_bytes=size, queue_position=None)
            if not kept:  # another replica took it over (this one seemed dead): its result wins
                logger.warning("job %s was taken over by another replica; this result is "
                               "dropped", job.id)
                if size is not None:
                    self.video_path(job.id, job.format).unlink(missing_ok=True)
        try:
            if not self.closing:
                await self._db(write)
        finally:
            self.local.pop(job.id, None)
            self._last_step_write.pop(job.id, None)

    async def get(self, job_id: str) -> Job | None:
        if job_id in self.local:
            return self.local[job_id]
        def read():
            row = self.db.get(job_id)
            return row, (self.db.request(job_id) if row is not None else None)
        row, request = await self._db(read)
        if row is None:
            return None
        output = OutputSpec.model_validate(request["output"]) if request.get("output") else None
        return Job(id=row["id"], seed=row["seed"], format=row["format"],
                   interpolation=output and interpolation_header(output),
                   total_steps=row["total_steps"], status=row["status"], step=row["step"],
                   attempt=row["attempt"], created_at=row["created_at"],
                   finished_at=row["finished_at"], media_type=row["media_type"],
                   error=_error_from(row["error"]), timings=json.loads(row["timings"] or "{}"),
                   queue_position=row["queue_position"])

    async def read_video(self, job: Job) -> bytes | None:
        if job.video is not None:
            return job.video
        path = self.video_path(job.id, job.format)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None

    async def request_cancel(self, job_id: str) -> None:
        """Cancel a job another replica runs: it stops at its next check (a heartbeat)."""
        await self._db(self.db.request_cancel, job_id)

    async def remove(self, job: Job) -> None:
        def delete():
            self.db.delete(job.id)
            self._remove_files(job.id, job.format)
        await self._db(delete)

    async def heartbeat(self) -> list[str]:
        """Renew this replica's jobs (their queue positions too); the ids of local jobs
        whose cancel was asked at another replica."""
        # Read here, in the event loop that moves the queue; written only when it moved.
        moved = []
        for job in list(self.local.values()):
            if job.status == "queued" and job.ticket is not None:
                position = job.ticket.position
                if position != job.queue_position:
                    job.queue_position = position
                    moved.append((job.id, position))

        def renew():
            for job_id, position in moved:
                self.db.update(job_id, self.owner, queue_position=position)
            return self.db.renew(self.owner, time.time())
        return await self._db(renew)

    async def claim_orphans(self, everyone: bool = False) -> list[tuple[Job, dict, np.ndarray | None]]:
        """Take over the unfinished jobs whose replica died: those whose heartbeat is older
        than the lease, or (`everyone`, at the start of a server that is the only one on
        its SQLite file) all of other owners. Each comes back as (job, request, image);
        a job past MAX_ATTEMPTS comes back failed, with no image."""
        stale_before = float("inf") if everyone else time.time() - self.lease

        def claim():
            taken = []
            for job_id, old_owner, old_heartbeat in self.db.orphans(self.owner, stale_before):
                attempt = self.db.claim(job_id, old_owner, old_heartbeat, self.owner, time.time())
                if attempt is None:
                    continue  # another replica was first
                row = self.db.get(job_id)
                request = self.db.request(job_id)
                job = Job(id=job_id, seed=row["seed"], format=row["format"],
                          total_steps=row["total_steps"], attempt=attempt,
                          created_at=row["created_at"], webhook=request.get("webhook"),
                          interpolation=interpolation_header(OutputSpec.model_validate(request["output"])))
                image = None
                if attempt <= MAX_ATTEMPTS:
                    try:
                        image = np.load(self._input_path(job_id))
                    except OSError as e:
                        logger.error("job %s: its input image is gone (%s)", job_id, e)
                taken.append((job, request, image))
            return taken
        return await self._db(claim)

    async def prune(self, now: float | None = None) -> None:
        """Forget finished jobs past their time, then the oldest past `max_finished` jobs
        or `max_bytes` of videos; their files go with them."""
        now = time.time() if now is None else now

        def prune():
            kept, kept_bytes = 0, 0
            for job_id, finished_at, size, fmt in self.db.finished():
                if now - finished_at > self.ttl or kept >= self.max_finished or \
                        kept_bytes + size > self.max_bytes:
                    self.db.delete(job_id)
                    self._remove_files(job_id, fmt)
                else:
                    kept, kept_bytes = kept + 1, kept_bytes + size
        await self._db(prune)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self.db.close()


def _log_failure(future) -> None:
    e = future.exception()
    if e is not None:
        logger.warning("could not record a job's progress: %s", e)


__all__ = ["DatabaseUnavailable", "FINISHED", "Job", "JobStore", "MAX_ATTEMPTS"]
