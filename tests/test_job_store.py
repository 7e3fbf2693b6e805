"""The job store in-process (bentosvd/api/jobs.py), on a real SQLite file: records and
files, retention by age, count and bytes (at open and by the API's periodic clean-up), and
the take-over of a dead replica's jobs by exactly one other. The same code on PostgreSQL,
across real servers: tests/test_replicas.py."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from bentosvd.api import generations
from bentosvd.api.generations import Generations
from bentosvd.api.jobs import MAX_ATTEMPTS, Job, JobStore
from bentosvd.config import Settings
from bentosvd.errors import ServiceError

IMAGE = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
REQUEST = {"params": {"seed": 1}, "job": {"num_frames": 8}, "output": {"format": "mp4", "fps": 7}}


def store(folder, **limits) -> JobStore:
    kwargs = dict(ttl=3600, max_finished=10, max_bytes=10**9, lease=10) | limits
    s = JobStore(folder, None, **kwargs)
    asyncio.run(s.open())
    return s


def run(coroutine):
    return asyncio.run(coroutine)


def finished_job(s: JobStore, video: bytes, finished_at: float | None = None) -> Job:
    job = Job(seed=1, format="mp4", total_steps=8)
    run(s.add(job, REQUEST, IMAGE))
    job.succeed(video, "video/mp4")
    if finished_at is not None:
        job.finished_at = finished_at
    run(s.finish(job))
    return job


def test_a_job_is_recorded_with_its_files_and_read_back(tmp_path):
    s = store(tmp_path)
    job = Job(seed=42, format="mp4", total_steps=8)
    run(s.add(job, REQUEST, IMAGE))
    assert (tmp_path / "inputs" / f"{job.id}.npy").exists()
    job.status, job.step = "running", 3
    s.progressed(job)
    other = store(tmp_path)  # another process on the same files (a restart)
    assert run(other.get(job.id)).to_json()["step"] == 3
    job.succeed(b"video bytes", "video/mp4")
    run(s.finish(job))
    assert not (tmp_path / "inputs" / f"{job.id}.npy").exists()  # the input goes once done
    read = run(other.get(job.id))
    assert read.status == "succeeded" and read.seed == 42 and read.video is None
    assert run(other.read_video(read)) == b"video bytes"
    failed = Job(seed=1, format="mp4", total_steps=8)
    run(s.add(failed, REQUEST, IMAGE))
    failed.fail(ServiceError("the GPU ran out", status=503, fix="try again", request_id=failed.id))
    run(s.finish(failed))
    error = run(other.get(failed.id)).error
    assert (error.status_code, error.message, error.fix) == (503, "the GPU ran out", "try again")
    assert run(other.get("no-such-job")) is None


@pytest.mark.parametrize("limits,kept", [
    (dict(ttl=100), [1, 2]),  # job 0 finished 1000 s ago
    (dict(max_finished=1), [2]),  # the newest
    (dict(max_bytes=25), [2]),  # 20 bytes each: one fits
])
def test_retention_forgets_the_oldest_with_their_files(tmp_path, limits, kept):
    s = store(tmp_path, **limits)

    now = time.time()
    jobs = [finished_job(s, bytes(20), finished_at=now - age) for age in (1000, 50, 10)]
    run(s.prune(now))
    left = [i for i, job in enumerate(jobs) if run(s.get(job.id)) is not None]
    assert left == kept
    videos = sorted(p.name for p in (tmp_path / "videos").iterdir())
    assert videos == sorted(f"{jobs[i].id}.mp4" for i in kept)


def test_opening_the_store_forgets_expired_jobs_with_their_files(tmp_path):
    before = store(tmp_path)  # the server that ran them, an hour to go for each
    old = finished_job(before, bytes(20), finished_at=time.time() - 10)
    queued = Job(seed=2, format="mp4", total_steps=8, created_at=time.time() - 10)
    run(before.add(queued, REQUEST, IMAGE))
    before.close()
    video, image = tmp_path / "videos" / f"{old.id}.mp4", tmp_path / "inputs" / f"{queued.id}.npy"
    assert video.exists() and image.exists()

    after = store(tmp_path, ttl=1)  # a restart with a shorter JOB_TTL: open() cleans up
    assert run(after.get(old.id)) is None and not video.exists()
    # Not finished: kept whatever its age, with its input, for a take-over.
    assert run(after.get(queued.id)).status == "queued" and image.exists()
    after.close()


def test_the_api_forgets_expired_jobs_while_it_runs(tmp_path, monkeypatch):
    """The clean-up the API runs every JOB_PRUNE_EVERY seconds beside its job heartbeats
    (Generations._keep_jobs), no restart: a job that expires after start is gone."""
    monkeypatch.setattr(generations, "JOB_PRUNE_EVERY", 0.2)
    settings = Settings(jobs_dir=str(tmp_path), jobs_database_url=None, job_ttl=1,
                        rife_model="none", gpu_workers=1)

    async def scenario():
        # No GPU worker answers (as while they load): the jobs are kept all the same.
        api = Generations(settings, settings.variant, workers=[])
        await api.start()
        try:
            done = Job(seed=1, format="mp4", total_steps=8)
            await api.jobs.add(done, REQUEST, IMAGE)
            done.succeed(bytes(20), "video/mp4")
            await api.jobs.finish(done)
            queued = Job(seed=2, format="mp4", total_steps=8)
            await api.jobs.add(queued, REQUEST, IMAGE)
            video = api.jobs.video_path(done.id, "mp4")
            assert await api.jobs.get(done.id) is not None and video.exists()
            deadline = time.monotonic() + 15
            while await api.jobs.get(done.id) is not None:
                assert time.monotonic() < deadline, "the expired job was not cleaned up"
                await asyncio.sleep(0.1)
            assert time.time() - done.finished_at > 1  # not before its TTL
            assert not video.exists()
            assert (await api.jobs.get(queued.id)).status == "queued"
        finally:
            await api.stop()

    run(scenario())


def test_a_dead_replicas_jobs_are_taken_over_once_by_one_replica(tmp_path):
    dead = store(tmp_path, lease=0.01)
    job = Job(seed=7, format="mp4", total_steps=8)
    run(dead.add(job, REQUEST, IMAGE))
    a, b = store(tmp_path, lease=0.01), store(tmp_path, lease=0.01)

    time.sleep(0.05)  # the dead replica's heartbeat goes stale
    taken = run(a.claim_orphans()) + run(b.claim_orphans())
    assert len(taken) == 1  # compare-and-set: the second finds it taken
    claimed, request, image = taken[0]
    assert claimed.id == job.id and claimed.attempt == 2 and claimed.seed == 7
    assert request == REQUEST and np.array_equal(image, IMAGE)
    # The dead replica, if it was only slow, no longer owns it: its result is dropped.
    job.succeed(b"late", "video/mp4")
    run(dead.finish(job))
    assert run(a.get(job.id)).status == "queued"


def test_a_job_interrupted_too_often_is_not_run_again(tmp_path):
    owner = store(tmp_path)
    job = Job(seed=7, format="mp4", total_steps=8)
    run(owner.add(job, REQUEST, IMAGE))
    for attempt in range(2, MAX_ATTEMPTS + 2):
        taken = run(store(tmp_path).claim_orphans(everyone=True))
        assert [(j.id, j.attempt) for j, _, _ in taken] == [(job.id, attempt)]
    assert taken[0][2] is None  # past MAX_ATTEMPTS: no image, the caller fails it


def test_a_clean_stop_puts_jobs_back_without_counting_the_attempt(tmp_path):
    s = store(tmp_path)
    job = Job(seed=7, format="mp4", total_steps=8)
    run(s.add(job, REQUEST, IMAGE))
    job.status = "running"
    run(s.put_back())
    s.close()
    taken = run(store(tmp_path).claim_orphans())  # at once: its heartbeat was cleared
    assert [(j.id, j.attempt, j.status) for j, _, _ in taken] == [(job.id, 1, "queued")]
