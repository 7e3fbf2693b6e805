"""Several replicas, one job space: two real `bentoml serve` replicas on different ports
share a real PostgreSQL server (tests/postgres.py) and one JOBS_DIR, as pods behind a load
balancer share the database and a ReadWriteMany volume. A job submitted to one is followed,
fetched and cancelled at the other, and when its replica is killed the other takes it over.
The tests run in order: the last one kills replica A."""

from __future__ import annotations

import httpx
import pytest

from tests.postgres import Postgres
from tests.test_durable_jobs import kill_9, wait_running
from tests.test_jobs import submit, wait_finished
from tests.test_reliability import wait_for_log
from tests.test_service import DEMO, LONG, assert_video

LEASE = "3"  # seconds without a heartbeat before a replica is taken for dead


@pytest.fixture(scope="module")
def postgres():
    server = Postgres().start()
    server.wait_connectable()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replicas(postgres, module_server, tmp_path_factory):  # the servers stop before PostgreSQL
    shared = str(tmp_path_factory.mktemp("shared-jobs"))
    env = dict(JOBS_DATABASE_URL=postgres.url, JOBS_DIR=shared, JOB_LEASE=LEASE, MAX_QUEUE="4")
    return module_server(**env), module_server(**env)


def test_a_job_submitted_to_one_replica_is_followed_and_fetched_at_the_other(replicas, test_image):
    a, b = replicas
    job = submit(a, test_image, {"seed": 21}).json()
    final, seen = wait_finished(b, job["id"])
    assert final["status"] == "succeeded" and final["attempt"] == 1, str(final)
    result = httpx.get(f"{b.url}/jobs/{job['id']}/result", timeout=30)
    assert result.status_code == 200 and result.headers["x-seed"] == "21"
    assert_video(result.content, frames=DEMO.num_frames, fps=7, size=(DEMO.width, DEMO.height))
    assert result.content == httpx.get(f"{a.url}/jobs/{job['id']}/result", timeout=30).content
    # A finished job forgotten at B is gone at A too.
    assert httpx.delete(f"{b.url}/jobs/{job['id']}", timeout=30).status_code == 200
    assert httpx.get(f"{a.url}/jobs/{job['id']}", timeout=30).status_code == 404


def test_a_cancel_sent_to_the_other_replica_stops_the_gpu_work(replicas, test_image):
    a, b = replicas
    job = submit(a, test_image, {"seed": 22, **LONG}).json()
    running = wait_running(b, job["id"])  # progress reaches B through the database
    since = a.log.stat().st_size
    assert httpx.delete(f"{b.url}/jobs/{job['id']}", timeout=30).status_code == 200
    final, _ = wait_finished(b, job["id"], timeout=60)
    assert final["status"] == "cancelled", final
    assert final["step"] < final["total_steps"], final  # stopped, not run to the end
    log = wait_for_log(a, "generation stopped: the caller left or cancelled", since=since)
    assert f"job {job['id']} was cancelled at another replica" in log
    assert running["step"] > 0


def test_a_killed_replicas_job_is_taken_over_and_finishes(replicas, test_image):
    a, b = replicas
    job = submit(a, test_image, {"seed": 23, **LONG}).json()
    wait_running(b, job["id"])
    kill_9(a)
    final, seen = wait_finished(b, job["id"], timeout=300)
    assert final["status"] == "succeeded" and final["attempt"] == 2, str(final)
    assert any(s["status"] == "queued" and s["attempt"] == 2 for s in seen) or \
        seen[0]["attempt"] == 1
    result = httpx.get(f"{b.url}/jobs/{job['id']}/result", timeout=30)
    assert result.status_code == 200 and result.headers["x-seed"] == "23"
    assert_video(result.content, frames=DEMO.num_frames, fps=7, size=(DEMO.width, DEMO.height))
