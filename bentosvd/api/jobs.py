"""Async jobs: what a submitted generation is doing, and its result once done.

A `Job` is created when a request is admitted and is updated as its generation moves
(queued → running, step i of N → succeeded / failed / cancelled). `POST /generate` waits
for its job; `POST /jobs` hands back the job's id at once and `JobStore` keeps the job so
that `GET /jobs/<id>` can report on it and `GET /jobs/<id>/result` return the video.

Finished jobs are kept in memory for `ttl` seconds, at most `max_finished` of them
(the oldest go first); they are lost when the server restarts.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from bentosvd.errors import ServiceError

FINISHED = ("succeeded", "failed", "cancelled")


@dataclass
class Job:
    seed: int
    format: str
    total_steps: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: str = "queued"  # queued, running, succeeded, failed, cancelled
    step: int = 0
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    video: bytes | None = None
    media_type: str | None = None
    error: ServiceError | None = None  # the answer the client gets
    timings: dict = field(default_factory=dict)
    work: object | None = None  # what the GPU worker is to do, until it has been sent
    ticket: object | None = None  # the dispatcher's Ticket while waiting / running
    task: asyncio.Task | None = None  # the generation, for async jobs

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

    def to_json(self) -> dict:
        position = getattr(self.ticket, "position", None) if self.status == "queued" else None
        return {
            "id": self.id, "status": self.status, "queue_position": position,
            "step": self.step, "total_steps": self.total_steps, "seed": self.seed,
            "format": self.format, "error": self.error and self.error.to_json(),
            "created_at": self.created_at, "finished_at": self.finished_at,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "status_url": f"/jobs/{self.id}", "result_url": f"/jobs/{self.id}/result",
        }


class JobStore:
    def __init__(self, *, ttl: float, max_finished: int):
        self.ttl, self.max_finished = ttl, max_finished
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def add(self, job: Job) -> Job:
        self.prune()
        self._jobs[job.id] = job
        return job

    def get(self, job_id: str) -> Job | None:
        self.prune()
        return self._jobs.get(job_id)

    def remove(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    def prune(self, now: float | None = None) -> None:
        """Forget finished jobs past their time, then the oldest past `max_finished`."""
        now = time.time() if now is None else now
        finished = [j for j in self._jobs.values() if j.finished]
        for job in finished:
            if now - job.finished_at > self.ttl:
                del self._jobs[job.id]
        finished = [j for j in self._jobs.values() if j.finished]
        for job in sorted(finished, key=lambda j: j.finished_at)[: max(0, len(finished) - self.max_finished)]:
            del self._jobs[job.id]
