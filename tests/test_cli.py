"""The command-line client, run as users run it (`python -m bentosvd.client.cli ...` in a
subprocess): against the real demo server for videos, failures and re-runs, and against a
small stand-in server for retries, which the real one cannot be made to answer on cue."""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal

import httpx
import pytest

from bentosvd.client.cli import (
    MAX_WAIT,
    build_parser,
    failure_from,
    find_images,
    params_from,
    parse_param,
    plan_batch,
    retry_delay,
    video_suffix,
)
from bentosvd.config import VARIANTS, Params
from bentosvd.media.video import probe_video
from tests.conftest import ROOT, free_port, make_image

DEMO = VARIANTS["demo"]


def cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bentosvd.client.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def assert_demo_video(path: Path, fps_id: int) -> None:
    info = probe_video(path.read_bytes())
    assert info["codec"] == "h264"
    assert info["frames"] == DEMO.num_frames
    assert info["fps"] == fps_id + 1


# --- against the real demo server -------------------------------------------------------------


def test_generate_writes_the_video_beside_the_image_and_prints_the_seed(server, tmp_path):
    image = make_image(tmp_path / "cat.png")
    result = cli("generate", image, "--url", server.url, "--seed", 7, "--fps-id", 5)
    assert result.returncode == 0, result.stderr
    assert_demo_video(tmp_path / "cat.mp4", fps_id=5)
    assert "seed 7" in result.stdout and " s," in result.stdout
    assert "demo model" in result.stderr  # X-Model-Warning is passed on


def test_batch_writes_videos_reports_the_servers_refusal_and_skips_them_on_rerun(server, tmp_path):
    images, videos = tmp_path / "images", tmp_path / "videos"
    images.mkdir()
    make_image(images / "a.png", seed=1)
    make_image(images / "b.jpg", fmt="JPEG", seed=2)
    (images / "c.png").write_bytes(b"not an image at all")
    (images / "notes.txt").write_text("not an image either, and not sent")
    with (images / "c.png").open("rb") as f:
        refusal = httpx.post(f"{server.url}/generate", files={"img": ("c.png", f, "image/png")},
                             timeout=60)
    assert refusal.status_code == 400

    result = cli("batch", images, videos, "--url", server.url, "--seed", 11, "--fps-id", 3)
    assert result.returncode == 1, result.stderr
    assert "done 2, skipped 0, failed 1" in result.stdout
    assert f"c.png: HTTP 400: {refusal.json()['message']}" in result.stdout
    for stem in ("a", "b"):
        assert_demo_video(videos / f"{stem}.mp4", fps_id=3)
        record = json.loads((videos / f"{stem}.json").read_text())
        assert record["seed"] == 11 and record["params"] == {"fps_id": 3, "seed": 11}
    assert sorted(p.name for p in videos.iterdir()) == ["a.json", "a.mp4", "b.json", "b.mp4"]

    written = {p.name: p.stat().st_mtime_ns for p in videos.iterdir()}
    again = cli("batch", images, videos, "--url", server.url, "--seed", 11, "--fps-id", 3)
    assert again.returncode == 1
    assert "done 0, skipped 2, failed 1" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in videos.iterdir()} == written


def test_batch_stops_at_once_when_the_server_refuses_the_params(server, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        make_image(images / f"{i}.png", size=(64, 64), seed=i)
    result = cli("batch", images, tmp_path / "videos", "--url", server.url, "--fps-id", 99,
                 "--concurrency", 1)
    assert result.returncode == 1
    assert "done 0, skipped 0, failed 3" in result.stdout
    assert "0.png: HTTP 400: params.fps_id: " in result.stdout  # BentoML's validation answer
    assert "1.png, 2.png: not sent: the batch stopped at 0.png" in result.stdout
    assert not (tmp_path / "videos").exists()


def test_an_unreachable_server_is_a_clear_error(tmp_path):
    image = make_image(tmp_path / "cat.png", size=(64, 64))
    result = cli("generate", image, "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "cannot reach the server at http://127.0.0.1:" in result.stderr
    assert not (tmp_path / "cat.mp4").exists()


# --- against a stand-in that answers on cue ---------------------------------------------------


HANG_UP = (None, {}, b"")  # an answer that closes the connection without a word


class StandIn:
    """Answers `POST /generate` with `answers` in turn (the last one for ever) and notes when
    each request came; `GET` (the client's /readyz check) gets 200."""

    def __init__(self, answers: list[tuple[int, dict, bytes]]):
        self.answers, self.times = answers, []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self._answer(200, {}, b"")

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                stand_in.times.append(time.monotonic())
                self._answer(*stand_in.answers[min(len(stand_in.times), len(stand_in.answers)) - 1])

            def _answer(self, status, headers, body):
                if status is None:
                    self.close_connection = True
                    return
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stand_in():
    servers = []

    def start(*answers):
        servers.append(StandIn(list(answers)))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def error(status: int, message: str, **headers) -> tuple[int, dict, bytes]:
    body = json.dumps({"error": "x", "message": message}).encode()
    return status, {"Content-Type": "application/json", **headers}, body


@pytest.fixture
def one_image(tmp_path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    make_image(images / "cat.png", size=(64, 64))
    return images


def test_batch_retries_429_after_the_servers_retry_after(stand_in, one_image, tmp_path):
    busy = error(429, "queue full", **{"Retry-After": "1"})
    video = (200, {"Content-Type": "video/mp4", "X-Seed": "5"}, b"video bytes")
    server = stand_in(busy, busy, video)
    result = cli("batch", one_image, tmp_path / "videos", "--url", server.url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(server.times) == 3
    # The client's own first backoff is 0.5 s; waiting 1 s each time is Retry-After's doing.
    gaps = [b - a for a, b in zip(server.times, server.times[1:])]
    assert all(1.0 <= gap < 2.0 for gap in gaps), gaps
    assert result.stderr.count("HTTP 429: queue full; try") == 2
    assert (tmp_path / "videos" / "cat.mp4").read_bytes() == b"video bytes"
    assert json.loads((tmp_path / "videos" / "cat.json").read_text())["seed"] == 5
    assert "done 1, skipped 0, failed 0" in result.stdout


def test_batch_gives_up_after_its_retries_and_says_why(stand_in, one_image, tmp_path):
    server = stand_in(error(503, "the GPU ran out of memory", **{"Retry-After": "1"}))
    result = cli("batch", one_image, tmp_path / "videos", "--url", server.url, "--retries", 2)
    assert result.returncode == 1
    assert len(server.times) == 3
    assert "done 0, skipped 0, failed 1" in result.stdout
    assert ("cat.png: HTTP 503: the GPU ran out of memory; gave up after 3 tries (--retries 2)"
            in result.stdout)
    assert not (tmp_path / "videos").exists()


def test_batch_does_not_retry_other_client_errors(stand_in, one_image, tmp_path):
    server = stand_in(error(413, "the image is too large"))
    result = cli("batch", one_image, tmp_path / "videos", "--url", server.url)
    assert result.returncode == 1
    assert len(server.times) == 1
    assert "cat.png: HTTP 413: the image is too large" in result.stdout


def test_batch_stops_when_the_server_stays_unreachable(stand_in, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        make_image(images / name, size=(64, 64))
    server = stand_in(HANG_UP)
    result = cli("batch", images, tmp_path / "videos", "--url", server.url, "--retries", 1,
                 "--concurrency", 1)
    assert result.returncode == 1
    assert len(server.times) == 2
    assert "a.png: connection failed (RemoteProtocolError" in result.stdout
    assert "gave up after 2 tries" in result.stdout
    assert "b.png: not sent: the batch stopped at a.png" in result.stdout


# --- the pure parts ---------------------------------------------------------------------------


def test_the_client_imports_no_bentoml():
    code = "import sys, bentosvd.client.cli; print('bentoml' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_retry_delay_honours_retry_after_caps_it_and_adds_jitter_on_top():
    rng = random.Random(0)
    for _ in range(50):
        assert 1.0 <= retry_delay(1, "1", rng) <= 1.25
        assert MAX_WAIT <= retry_delay(1, "3600", rng) <= MAX_WAIT * 1.25
        assert 0.5 <= retry_delay(1, None, rng) <= 0.625  # no header: 0.5 s, doubling
        assert 4.0 <= retry_delay(4, "soon", rng) <= 5.0  # unreadable header: the same
    in_ten_seconds = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=10),
                                     usegmt=True)
    assert 8.0 <= retry_delay(1, in_ten_seconds, rng) <= 12.5


def test_failure_from_reads_both_error_shapes_and_tells_params_refusals_apart():
    def answer(status, body):
        return failure_from(httpx.Response(status, **({"json": body} if isinstance(body, dict)
                                                      else {"text": body})))

    image = answer(400, {"error": "InvalidImage", "message": "not an image", "field": "img",
                         "fix": "send a PNG"})
    assert image.reason == "HTTP 400: not an image (fix: send a PNG)" and not image.stops_batch
    ours = answer(400, {"error": "InvalidParams", "message": "too big",
                        "field": "params.decoding_t"})
    assert ours.stops_batch
    bentoml = answer(400, {"error": "1 validation error", "detail": [
        {"loc": ["params", "seed"], "msg": "Input should be greater than or equal to 0"}]})
    assert bentoml.reason == "HTTP 400: params.seed: Input should be greater than or equal to 0"
    assert bentoml.stops_batch
    assert answer(502, "<html>Bad Gateway</html>").reason == "HTTP 502: <html>Bad Gateway</html>"


def test_params_come_from_the_flags_and_param_values_are_read_as_json():
    assert parse_param("seed=null") == ("seed", None)
    assert parse_param("cond_aug=0.1") == ("cond_aug", 0.1)
    assert parse_param("format=webm") == ("format", "webm")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_param("seed")
    args = build_parser().parse_args(["batch", "in", "out", "--seed", "3", "--cond-aug", "0.5",
                                      "--param", "motion_bucket_id=9", "--param", "seed=4"])
    assert params_from(args) == {"seed": 4, "cond_aug": 0.5, "motion_bucket_id": 9}
    samples = {"format": ("webm", "webm"), "sizing": ("pad", "pad"),
               "orientation": ("portrait", "portrait"), "boomerang": ("true", True),
               "interpolation": ("rife", "rife")}
    for name in Params.model_fields:  # every field has its flag
        text, value = samples.get(name, ("1", 1))
        args = build_parser().parse_args(["generate", "cat.png", f"--{name.replace('_', '-')}", text])
        assert params_from(args) == {name: value}


def test_a_field_added_to_params_gets_its_flag_and_sets_the_extension():
    class WithFormat(Params):
        format: Literal["mp4", "webm", "gif", "webp"] = "mp4"

    args = build_parser(WithFormat).parse_args(["generate", "cat.png", "--format", "webm"])
    params = params_from(args, WithFormat)
    assert params == {"format": "webm"} and video_suffix(params) == ".webm"
    assert video_suffix({}) == ".mp4"
    with pytest.raises(SystemExit):
        build_parser(WithFormat).parse_args(["generate", "cat.png", "--format", "avi"])


def test_find_images_and_plan_batch(tmp_path):
    images = tmp_path / "in"
    (images / "sub").mkdir(parents=True)
    for name in ["b.PNG", "a.jpeg", "c.webp", "._a.png", "x.gif", "sub/d.jpg"]:
        (images / name).write_bytes(b"x")
    (images / "out").mkdir()
    (images / "out" / "old.webp").write_bytes(b"x")  # an earlier run's output, not an input
    assert [p.name for p in find_images(images)] == ["a.jpeg", "b.PNG", "c.webp"]
    found = find_images(images, recursive=True, exclude=images / "out")
    assert [str(p.relative_to(images)) for p in found] == ["a.jpeg", "b.PNG", "c.webp", "sub/d.jpg"]
    jobs = plan_batch(found, images, tmp_path / "videos", ".mp4")
    assert [j.video.relative_to(tmp_path) for j in jobs][-1] == Path("videos/sub/d.mp4")
    assert jobs[0].sidecar == tmp_path / "videos" / "a.json"

    (images / "a.png").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"a.jpeg, a.png → a.mp4"):
        plan_batch(find_images(images), images, tmp_path / "videos", ".mp4")
    with pytest.raises(ValueError, match="would overwrite an input image"):
        plan_batch([images / "c.webp"], images, images, ".webp")
