"""Nothing accepted is lost (bentosvd/api/jobs.py): against real `bentoml serve` processes
killed for real. Async jobs outlive a `kill -9` of the whole server and a SIGTERM, a killed
GPU worker answers 503 with Retry-After and its job runs again, and retention keeps to its
limits. Replicas sharing PostgreSQL are tests/test_replicas.py."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

from tests.test_jobs import submit, wait_finished
from tests.test_service import DEMO, LONG, assert_video, post



def wait_running(server, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = httpx.get(f"{server.url}/jobs/{job_id}", timeout=10).json()
        if status["status"] == "running" and status["step"] > 0:
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not running in {timeout} s: {status}")


def kill_9(server) -> None:
    """Every process of the server at once, as a node dying would: no shutdown hook runs."""
    processes = server.processes()
    assert len(processes) >= 3  # the server, the API service, a GPU worker
    server.kill()
    assert not psutil.wait_procs(processes, timeout=10)[1]


def worker_process(server) -> psutil.Process:
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        if "GenerationWorker" in " ".join(child.cmdline()):
            return child
    raise AssertionError("no GenerationWorker process")


def test_jobs_outlive_a_kill_9_of_the_whole_server(start_server, test_image, tmp_path):
    jobs_dir = str(tmp_path / "jobs")
    server = start_server(JOBS_DIR=jobs_dir, MAX_QUEUE="4")
    done = submit(server, test_image, {"seed": 1}).json()
    assert wait_finished(server, done["id"])[0]["status"] == "succeeded"
    running = submit(server, test_image, {"seed": 2, **LONG}).json()
    queued = submit(server, test_image, {"seed": 3}).json()
    wait_running(server, running["id"])
    kill_9(server)

    again = start_server(JOBS_DIR=jobs_dir, MAX_QUEUE="4")
    # Finished before the crash: still listed, still fetchable.
    status = httpx.get(f"{again.url}/jobs/{done['id']}").json()
    assert status["status"] == "succeeded" and status["attempt"] == 1, status
    video = httpx.get(f"{again.url}/jobs/{done['id']}/result", timeout=30)
    assert video.status_code == 200 and video.headers["x-seed"] == "1"
    assert_video(video.content, frames=DEMO.num_frames, fps=7, size=(DEMO.width, DEMO.height))
    # Running or queued at the crash: run again, once, with the same seed; never a 404.
    for job, seed, params in ((running, 2, LONG), (queued, 3, {})):
        final, _ = wait_finished(again, job["id"], timeout=240)
        assert final["status"] == "succeeded" and final["attempt"] == 2, str(final)
        result = httpx.get(f"{again.url}/jobs/{job['id']}/result", timeout=30)
        assert result.headers["x-seed"] == str(seed)
        # The same video as the same request gives now: the same input and seed.
        assert post(again, test_image, {"seed": seed, **params}, timeout=240).content == result.content


def wait_busy(process: psutil.Process, cpu_seconds: float = 1.0, timeout: float = 60) -> None:
    """Until `process` has used `cpu_seconds` more: an idle worker uses next to none, so
    it is generating."""
    start, deadline = sum(process.cpu_times()[:2]), time.monotonic() + timeout
    while sum(process.cpu_times()[:2]) - start < cpu_seconds:
        assert time.monotonic() < deadline, "the worker did not start generating"
        time.sleep(0.1)


def test_a_killed_worker_answers_503_with_retry_after_and_its_job_runs_again(
        start_server, test_image):
    server = start_server(MAX_QUEUE="4")
    worker = worker_process(server)
    answers = {}

    def call(name, params):
        answers[name] = post(server, test_image, params, timeout=300)

    first = threading.Thread(target=call, args=("running", {"seed": 5, **LONG}))
    first.start()
    wait_busy(worker)
    behind = threading.Thread(target=call, args=("queued", {"seed": 6}))
    behind.start()
    time.sleep(0.5)  # queued behind the first (the queue is the API's; nothing to poll)
    worker.kill()
    # Both probes at once while the worker restarts: (/readyz, /livez) each time.
    probes = []
    with ThreadPoolExecutor(2) as pool:
        while behind.is_alive() and len(probes) < 1500:
            ready, live = (pool.submit(httpx.get, f"{server.url}{path}", timeout=10)
                           for path in ("/readyz", "/livez"))
            probes.append((ready.result().status_code, live.result().status_code))
            time.sleep(0.2)
    first.join(300)
    behind.join(300)
    refused = answers["running"]
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"] == "WorkerRestarted" and "restarted" in refused.json()["message"]
    # Queued behind it: served once the worker is back.
    assert answers["queued"].status_code == 200, answers["queued"].text
    # /readyz said so while the worker restarted; /livez stayed 200 throughout (the API
    # lives, and a restarting worker is not a reason to restart the pod).
    assert any(ready == 503 for ready, _ in probes), probes
    assert all(live == 200 for _, live in probes), probes
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert httpx.get(f"{server.url}/livez").status_code == 200

    # An async job whose worker dies runs again (attempt 2) and succeeds.
    job = submit(server, test_image, {"seed": 7, **LONG}).json()
    wait_running(server, job["id"])
    worker_process(server).kill()
    final, _ = wait_finished(server, job["id"], timeout=300)
    assert final["status"] == "succeeded" and final["attempt"] == 2, str(final)


def test_sigterm_leaves_no_process_and_puts_the_job_back(start_server, test_image, tmp_path):
    jobs_dir = str(tmp_path / "jobs")
    server = start_server(JOBS_DIR=jobs_dir)
    processes = psutil.Process(server.proc.pid).children(recursive=True)
    assert any("GenerationWorker" in " ".join(p.cmdline()) for p in processes)
    # BentoML's task results: a file this server chose (service.py), left to none after it.
    task_store = Path(processes[0].environ()["BENTOML_RESULT_STORE"])
    assert task_store.name == f"bentosvd-tasks-{server.proc.pid}.db"
    job = submit(server, test_image, {"seed": 8, **LONG}).json()
    wait_running(server, job["id"])
    assert task_store.exists()
    os.killpg(server.proc.pid, signal.SIGTERM)
    server.proc.wait(60)
    gone, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    assert not task_store.exists()

    again = start_server(JOBS_DIR=jobs_dir)
    final, _ = wait_finished(again, job["id"], timeout=300)
    # Put back by a clean stop: the interrupted attempt is not counted.
    assert final["status"] == "succeeded" and final["attempt"] == 1, str(final)
