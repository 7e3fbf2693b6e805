"""`image_to_video`, the BentoML task: submitted, followed and fetched with BentoML's own
client and with plain HTTP, through the same generation path as `POST /generate`."""

from __future__ import annotations

import time
from pathlib import Path

import bentoml
import httpx
import pytest
from bentoml.exceptions import BentoMLException

from bentosvd.config import VARIANTS
from bentosvd.media.video import probe_video
from tests.test_service import assert_video, post

pytestmark = pytest.mark.server
DEMO = VARIANTS["demo"]


def sync_client(url: str) -> bentoml.SyncHTTPClient:
    client = bentoml.SyncHTTPClient(url, timeout=120)
    # BentoML 1.4.39-1.4.40: SyncHTTPClient's task submit closes `self._opened_files`, which
    # it never made (AsyncHTTPClient closes its file manager instead); without this the
    # submit is sent and then raises AttributeError. docs/api.md says so.
    client._opened_files = []
    return client


def wait_done(task, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while (status := task.get_status().value) == "in_progress":
        assert time.monotonic() < deadline, "the task did not finish"
        time.sleep(0.3)
    return status


def test_task_round_trip_with_the_sync_client(server, test_image):
    with sync_client(server.url) as client:
        task = client.image_to_video.submit(img=test_image, params={"seed": 5, "fps_id": 9})
        assert wait_done(task) == "completed"
        video = task.get()
    data = Path(video).read_bytes()
    assert_video(data, frames=DEMO.num_frames, fps=10, size=(DEMO.width, DEMO.height))
    # The same generation path as POST /generate: the same seed, the same video.
    direct = post(server, test_image, {"seed": 5, "fps_id": 9})
    assert direct.status_code == 200 and direct.content == data


def test_task_over_plain_http_and_its_errors(server, test_image):
    with test_image.open("rb") as f:
        submitted = httpx.post(f"{server.url}/image_to_video/submit", timeout=60,
                               files={"img": ("photo.png", f, "image/png")},
                               data={"params": '{"seed": 6, "format": "gif"}'})
    assert submitted.status_code == 200, submitted.text
    task_id = submitted.json()["task_id"]
    deadline = time.monotonic() + 120
    while (status := httpx.get(f"{server.url}/image_to_video/status",
                               params={"task_id": task_id}, timeout=30).json())["status"] == "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert status["status"] == "completed", status
    result = httpx.get(f"{server.url}/image_to_video/get", params={"task_id": task_id}, timeout=30)
    assert result.status_code == 200
    assert result.headers["content-type"] == "image/gif" and result.headers["x-seed"] == "6"
    gif = probe_video(result.content)
    assert (gif["codec"], gif["frames"], gif["width"], gif["height"]) == \
        ("gif", DEMO.num_frames, DEMO.width, DEMO.height), gif

    # Bad params are refused at submit, before a task exists, as at /generate.
    with test_image.open("rb") as f:
        bad = httpx.post(f"{server.url}/image_to_video/submit", timeout=60,
                         files={"img": ("photo.png", f, "image/png")},
                         data={"params": '{"motion_bucket_id": 9999}'})
    assert bad.status_code == 400 and "motion_bucket_id" in bad.json()["message"], bad.text
    # What docs/api.md says of cancel under `bentoml serve`: refused, nothing stopped.
    cancel = httpx.put(f"{server.url}/image_to_video/cancel", params={"task_id": task_id}, timeout=30)
    assert cancel.status_code >= 400 and "not supported" in cancel.text, cancel.text
    missing = httpx.get(f"{server.url}/image_to_video/status", params={"task_id": "nope"}, timeout=30)
    assert missing.status_code == 404


def test_a_task_that_fails_says_why(server, tmp_path):
    """An image the server cannot decode is found only when the task runs: the task fails,
    and its result is the JSON error `POST /generate` would have answered."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    with sync_client(server.url) as client:
        task = client.image_to_video.submit(img=broken)
        assert wait_done(task) == "failed"
        with pytest.raises(BentoMLException) as error:
            task.get()
    assert "img" in str(error.value)
