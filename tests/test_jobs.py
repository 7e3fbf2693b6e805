"""Async jobs, output formats, the optional params, /info and the per-request timings,
against the real demo server (256×144, 4 frames, 4 steps)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from bentosvd.config import VARIANTS
from bentosvd.media.video import probe_video
from tests.conftest import ROOT, demo_env, make_image
from tests.test_service import DEMO, LONG, assert_video, frames_at, post


def submit(server, image, params: dict | None = None) -> httpx.Response:
    with image.open("rb") as f:
        return httpx.post(f"{server.url}/jobs", files={"img": (image.name, f, "image/png")},
                          data={"params": json.dumps(params or {})}, timeout=60)


def wait_finished(server, job_id: str, timeout: float = 120) -> tuple[dict, list[dict]]:
    """Poll the job until it has finished: (last status, every status seen)."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = httpx.get(f"{server.url}/jobs/{job_id}", timeout=10).json()
        seen.append(status)
        if status["status"] in ("succeeded", "failed", "cancelled"):
            return status, seen
        time.sleep(0.2)
    raise AssertionError(f"job not finished in {timeout} s: {seen[-1]}")


def test_job_reports_progress_then_serves_the_video(server, test_image):
    # Twice the demo's steps: polled every 0.2 s, a step between the first and the last is
    # seen even on a fast machine.
    params = {"seed": 11, "num_inference_steps": 2 * DEMO.num_inference_steps}
    response = submit(server, test_image, params)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}"
    total = params["num_inference_steps"]
    assert job["status"] in ("queued", "running") and job["total_steps"] == total
    final, seen = wait_finished(server, job["id"])
    assert final["status"] == "succeeded" and final["step"] == total
    steps = [s["step"] for s in seen]
    assert steps == sorted(steps), "progress only moves forward"
    assert any(0 < s["step"] < total for s in seen), f"no step seen: {steps}"
    assert {"queue_wait", "denoise", "vae_decode", "video_encode"} <= set(final["timings"])
    result = httpx.get(f"{server.url}{final['result_url']}", timeout=30)
    assert result.status_code == 200 and result.headers["x-seed"] == "11"
    assert_video(result.content, frames=DEMO.num_frames, fps=7, size=(DEMO.width, DEMO.height))
    # The same request through POST /generate gives the same bytes.
    assert post(server, test_image, params).content == result.content


def test_queued_jobs_know_their_place_and_cancel_stops_the_work(server, test_image):
    # The first runs long enough to be cancelled while it runs.
    jobs = [submit(server, test_image, {"seed": i, **(LONG if i == 0 else {})}).json() for i in range(3)]
    statuses = [httpx.get(f"{server.url}/jobs/{j['id']}").json() for j in jobs]
    assert statuses[2]["status"] == "queued" and statuses[2]["queue_position"] in (0, 1), statuses
    # Cancel the last (queued) and the first (running) one; the middle one still finishes.
    for job in (jobs[2], jobs[0]):
        cancelled = httpx.delete(f"{server.url}/jobs/{job['id']}", timeout=30)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert httpx.get(f"{server.url}/jobs/{jobs[0]['id']}/result").status_code == 410
    final, _ = wait_finished(server, jobs[1]["id"])
    assert final["status"] == "succeeded"
    log = server.log.read_text()
    assert "generation stopped: the caller left or cancelled" in log  # the running one stopped


def test_job_errors_are_the_same_as_generates(server, test_image, tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    response = submit(server, garbage)
    assert response.status_code == 400 and response.json()["field"] == "img"
    assert submit(server, test_image, {"decoding_t": 99}).status_code == 400
    unknown = httpx.get(f"{server.url}/jobs/no-such-job")
    assert unknown.status_code == 404 and "no such job" in unknown.json()["message"]
    running = submit(server, test_image, {"seed": 1}).json()
    early = httpx.get(f"{server.url}/jobs/{running['id']}/result")
    assert early.status_code == 409 and "poll" in early.json()["message"]
    wait_finished(server, running["id"])


def test_finished_jobs_can_be_deleted(server, test_image):
    job = submit(server, test_image, {"seed": 2}).json()
    wait_finished(server, job["id"])
    assert httpx.delete(f"{server.url}/jobs/{job['id']}").status_code == 200
    assert httpx.get(f"{server.url}/jobs/{job['id']}").status_code == 404


@pytest.mark.parametrize(("fmt", "codec"), [("webm", "vp9"), ("gif", "gif"), ("webp", "webp")])
def test_output_formats_by_param(server, test_image, fmt, codec):
    response = post(server, test_image, {"seed": 0, "format": fmt})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == {"webm": "video/webm", "gif": "image/gif",
                                                "webp": "image/webp"}[fmt]
    assert f'filename="generated_video.{fmt}"' in response.headers["content-disposition"]
    info = probe_video(response.content)
    assert (info["format"], info["codec"], info["frames"]) == (fmt, codec, DEMO.num_frames)
    assert (info["width"], info["height"]) == (DEMO.width, DEMO.height)
    # GIF delays are in 1/100 s and WebP's in ms: 7 fps alternates delays, within one tick.
    assert info["fps"] == 7 if fmt == "webm" else abs(info["fps"] - 7) < 0.05


def test_output_format_by_accept_header(server, test_image):
    response = post(server, test_image, {"seed": 0}, headers={"Accept": "image/gif, */*;q=0.5"})
    assert response.headers["content-type"] == "image/gif"
    assert probe_video(response.content)["format"] == "gif"
    # The blog's own Accept (video/mp4) and none at all give MP4.
    assert post(server, test_image, {"seed": 0}).headers["content-type"] == "video/mp4"


def test_optional_params_change_the_video(server, test_image, tmp_path):
    short = post(server, test_image, {"seed": 0, "num_frames": 2, "num_inference_steps": 2,
                                      "min_guidance_scale": 1.0, "max_guidance_scale": 1.5})
    assert_video(short.content, frames=2, fps=7, size=(DEMO.width, DEMO.height))
    bounce = post(server, test_image, {"seed": 0, "num_frames": 3, "boomerang": True})
    assert_video(bounce.content, frames=4, fps=7, size=(DEMO.width, DEMO.height))  # 0 1 2 1
    smooth = post(server, test_image, {"seed": 0, "fps_id": 6, "interpolate_fps": 14})
    assert_video(smooth.content, frames=frames_at(14), fps=14, size=(DEMO.width, DEMO.height))
    portrait = post(server, test_image, {"seed": 0, "orientation": "portrait", "sizing": "pad"})
    assert_video(portrait.content, frames=DEMO.num_frames, fps=7, size=(DEMO.height, DEMO.width))


@pytest.mark.parametrize(("params", "field"), [
    ({"num_frames": DEMO.num_frames + 1}, "params.num_frames"),
    ({"num_frames": 4, "decoding_t": 5}, "params.decoding_t"),
    ({"min_guidance_scale": 3.0, "max_guidance_scale": 2.0}, "params.max_guidance_scale"),
    ({"min_guidance_scale": 0.5}, "params.min_guidance_scale"),  # diffusers: guidance off
    ({"fps_id": 6, "interpolate_fps": 7}, "params.interpolate_fps"),
    ({"format": "gif", "interpolate_fps": 60}, "params.format"),
])
def test_params_that_disagree_are_400_naming_the_field(server, test_image, params, field):
    response = post(server, test_image, params)
    assert response.status_code == 400, response.text
    assert response.json()["field"] == field and response.json()["fix"]


def test_info_gives_the_models_sizes_and_bounds(server):
    info = httpx.get(f"{server.url}/info").json()
    assert (info["model"], info["width"], info["height"]) == ("demo", DEMO.width, DEMO.height)
    assert info["warning"] and info["formats"] == ["mp4", "webm", "gif", "webp"]
    params = info["params"]
    assert params["fps_id"]["minimum"] == 1 and params["fps_id"]["maximum"] == 30
    assert params["decoding_t"]["maximum"] == DEMO.num_frames  # the model's, not the schema's 25
    assert params["num_inference_steps"]["default"] == DEMO.num_inference_steps
    assert params["sizing"]["enum"] == ["crop", "pad", "fit", "native"]
    assert VARIANTS["svd_xt"].num_frames == 25


def test_native_sizing_keeps_the_images_own_shape_in_multiples_of_64(server, tmp_path):
    """The upstream sample's sizing: a 1000x700 image within the demo's 256x144 pixels is
    229x160, rounded down to 192x128."""
    image = make_image(tmp_path / "wide.png", size=(1000, 700))
    response = post(server, image, {"seed": 1, "sizing": "native"})
    assert response.status_code == 200, response.text
    assert_video(response.content, frames=DEMO.num_frames, fps=7, size=(192, 128))


def test_each_answer_says_where_its_time_went(server, test_image):
    response = post(server, test_image, {"seed": 0})
    timing = dict(item.strip().split(";dur=") for item in response.headers["server-timing"].split(","))
    assert {"queue_wait", "gpu_wait", "image_encode", "denoise", "vae_decode", "video_encode"} <= set(timing)
    assert all(float(ms) >= 0 for ms in timing.values())
    request_id = response.headers["x-request-id"]
    log_line = next(line for line in server.log.read_text().splitlines() if request_id in line)
    logged = json.loads(log_line.split("generated ", 1)[1].split(" (trace=")[0])
    assert logged["seed"] == 0 and logged["params"]["fps_id"] == 6 and logged["format"] == "mp4"
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("svd_phase_seconds_bucket", "svd_queue_wait_seconds_count", 'phase="denoise"'):
        assert name in metrics, name


def test_the_next_generation_starts_while_the_last_video_is_encoded(server, test_image):
    """One GPU worker: once a job's frames are made, the worker takes the next job while it
    encodes the first (a slow encode here: interpolated to 60 fps, VP9). Both are then
    "running" at once, which a worker held until its video was sent would never show."""
    slow = submit(server, test_image, {"seed": 1, "interpolate_fps": 60, "boomerang": True,
                                       "interpolation": "minterpolate", "format": "webm"}).json()
    nxt = submit(server, test_image, {"seed": 2}).json()
    # Generous: on a busy machine the demo's CPU work can take many times its ~15 s here.
    overlap, deadline = False, time.monotonic() + 300
    while time.monotonic() < deadline:
        a = httpx.get(f"{server.url}/jobs/{slow['id']}").json()
        b = httpx.get(f"{server.url}/jobs/{nxt['id']}").json()
        if a["status"] == "running" and a["step"] == a["total_steps"] and b["status"] == "running":
            overlap = True
        if a["status"] != "running" and a["status"] != "queued":
            break
        time.sleep(0.05)
    assert a["status"] == "succeeded" and overlap, (a, b)
    assert wait_finished(server, nxt["id"])[0]["status"] == "succeeded"


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_torch_threads_leave_the_encoder_its_cores(bentoml_home, given, expected):
    """The worker module sets OMP_WAIT_POLICY=PASSIVE (unless the user set one) before
    anything loads torch, whose OpenMP reads it only when it loads: importing the service
    as `bentoml serve` does must not have loaded torch yet."""
    env = demo_env(bentoml_home)
    env.pop("OMP_WAIT_POLICY", None)
    if given:
        env["OMP_WAIT_POLICY"] = given
    probe = "import os, sys, service; print('torch' in sys.modules, os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout.split()
    assert out == ["False", expected]
