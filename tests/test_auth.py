"""Keys at the door (bentosvd/api/auth.py): a real server with API_KEYS and API_KEYS_FILE
set answers nothing but the probes and the web page's files without a key, takes a key
added to or removed from the file without a restart, never logs a key; the CLI and the web
page send the key they are given."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from bentosvd.api.auth import ApiKeys, RequireApiKey
from bentosvd.config import VARIANTS
from tests.conftest import ROOT, make_image
from tests.test_cli import cli
from tests.test_service import assert_video, post
from tests.test_ui import UI, browser, chromium  # noqa: F401 (fixtures)

DEMO = VARIANTS["demo"]
KEYS = ("first-key-5b1e0c", "second-key-9d27a4")
FILE_KEY = "file-key-77c3e1"


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"# rotated by the operator\n{FILE_KEY}\n")
    return path


@pytest.fixture(scope="module")
def keyed(module_server, keys_file):
    return module_server(API_KEYS=",".join(KEYS), API_KEYS_FILE=str(keys_file),
                          METRICS_NEED_KEY="true")


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def assert_refused(response: httpx.Response, problem: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="bentosvd"'
    body = response.json()
    assert body["error"] == "Unauthorized" and problem in body["message"], body
    assert body["field"] == "Authorization" and "Bearer" in body["fix"]


@pytest.mark.parametrize("method,path", [
    ("GET", "/info"), ("POST", "/generate"), ("POST", "/jobs"), ("GET", "/jobs/abc"),
    ("DELETE", "/jobs/abc"), ("GET", "/jobs/abc/result"), ("GET", "/metrics"),
    ("GET", "/docs.json"), ("GET", "/no-such-route"),
])
def test_every_route_but_the_probes_needs_a_key(keyed, method, path):
    assert_refused(httpx.request(method, keyed.url + path, timeout=30), "no API key")
    assert_refused(httpx.request(method, keyed.url + path, headers=bearer("wrong"), timeout=30),
                   "a wrong API key")
    assert_refused(httpx.request(method, keyed.url + path, timeout=30,
                                 headers={"Authorization": f"Basic {KEYS[0]}"}), "a wrong API key")


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/ui/", "/ui/app.js"])
def test_the_probes_and_the_page_stay_open(keyed, path):
    assert httpx.get(keyed.url + path, timeout=30).status_code == 200


def test_a_key_opens_every_route_and_is_never_logged(keyed, test_image, keys_file):
    assert httpx.get(f"{keyed.url}/info", headers=bearer(KEYS[1]), timeout=30).status_code == 200
    assert httpx.get(f"{keyed.url}/metrics", headers=bearer(KEYS[0]), timeout=30).status_code == 200
    response = post(keyed, test_image, {"seed": 1}, headers=bearer(KEYS[0]))
    assert response.status_code == 200, response.text
    assert_video(response.content, frames=DEMO.num_frames, fps=7, size=(DEMO.width, DEMO.height))
    submitted = httpx.post(f"{keyed.url}/jobs", files={"img": test_image.read_bytes()},
                           headers=bearer(FILE_KEY), timeout=30)
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()["id"]
    assert httpx.get(f"{keyed.url}/jobs/{job}", headers=bearer(FILE_KEY), timeout=30).status_code == 200
    assert httpx.delete(f"{keyed.url}/jobs/{job}", headers=bearer(FILE_KEY), timeout=30).status_code == 200
    log = keyed.log.read_text(errors="replace")
    assert not any(key in log for key in (*KEYS, FILE_KEY))


def test_a_key_is_rotated_through_the_file_without_a_restart(keyed, keys_file):
    info = f"{keyed.url}/info"
    new = "rotated-in-key-0f4b2a"
    keys_file.write_text(f"{FILE_KEY}\n{new}\n")
    assert httpx.get(info, headers=bearer(new), timeout=30).status_code == 200
    keys_file.write_text(f"{new}\n")  # the old file key retired
    assert_refused(httpx.get(info, headers=bearer(FILE_KEY), timeout=30), "a wrong API key")
    assert httpx.get(info, headers=bearer(new), timeout=30).status_code == 200
    assert httpx.get(info, headers=bearer(KEYS[0]), timeout=30).status_code == 200  # API_KEYS stay
    keys_file.write_text(f"{FILE_KEY}\n")


def test_the_cli_sends_its_key(keyed, test_image, tmp_path, monkeypatch):
    out = tmp_path / "video.mp4"
    refused = cli("generate", test_image, "-o", out, "--url", keyed.url, "--seed", 1)
    assert refused.returncode != 0 and "HTTP 401" in refused.stderr, refused.stderr
    assert "--api-key" in refused.stderr and not out.exists()
    done = cli("generate", test_image, "-o", out, "--url", keyed.url, "--seed", 1,
               "--api-key", KEYS[1])
    assert done.returncode == 0, done.stderr
    assert_video(out.read_bytes(), frames=DEMO.num_frames, fps=7, size=(DEMO.width, DEMO.height))


def cli_keyed_by_env(*args, key: str | None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI as a user runs it with `BENTOSVD_API_KEY=key` (None: no key variable at all)
    and no --api-key."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("BENTOSVD_API_KEY", "BENTOSVD_TOKEN")}
    if key is not None:
        env["BENTOSVD_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "bentosvd.client.cli", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_the_batch_cli_takes_its_key_from_the_environment(keyed, tmp_path):
    images, videos = tmp_path / "images", tmp_path / "videos"
    images.mkdir()
    make_image(images / "a.png", seed=3)
    done = cli_keyed_by_env("batch", images, videos, "--url", keyed.url, "--seed", 2, key=KEYS[0])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "done 1, skipped 0, failed 0" in done.stdout, done.stdout
    assert_video((videos / "a.mp4").read_bytes(), frames=DEMO.num_frames, fps=7,
                 size=(DEMO.width, DEMO.height))


def test_the_batch_cli_without_a_key_says_401_and_how_to_pass_one(keyed, tmp_path):
    images, videos = tmp_path / "images", tmp_path / "videos"
    images.mkdir()
    for name in ("a.png", "b.png"):
        make_image(images / name)
    refused = cli_keyed_by_env("batch", images, videos, "--url", keyed.url, "--concurrency", 1,
                               key=None)
    output = refused.stdout + refused.stderr
    assert refused.returncode == 1, output
    assert "Traceback" not in output, output
    # The server's own message, then how to pass a key; the next image is not sent at all.
    assert "failed: a.png: HTTP 401: this server needs an API key" in refused.stdout, output
    assert "--api-key" in refused.stdout and "BENTOSVD_API_KEY" in refused.stdout, output
    assert "done 0, skipped 0, failed 2" in refused.stdout, output
    assert "not sent: the batch stopped at a.png" in refused.stdout, output
    assert not videos.exists() or not any(videos.iterdir())


def test_the_page_asks_for_the_key_and_keeps_it_for_the_session(browser, keyed):  # noqa: F811
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    ui = UI(page, keyed)
    page.goto(f"{keyed.url}/ui/")
    page.wait_for_selector("#key-form:not([hidden])")
    assert "needs an API key" in page.inner_text("#model")
    page.fill("#key", "not-the-key")
    page.click("#key-form button")
    page.wait_for_selector("#key-problem:not([hidden])")
    assert "did not accept" in page.inner_text("#key-problem")
    page.fill("#key", KEYS[0])
    page.click("#key-form button")
    page.wait_for_selector("#param-seed")  # the form is built from /info
    assert page.is_hidden("#key-form") and page.is_hidden("#error")
    page.reload()  # kept for the tab's session: no question the second time
    page.wait_for_selector("#param-seed")
    assert page.is_hidden("#key-form")
    context.close()
    assert not ui.script_errors, ui.script_errors


# ------------------------------------------------------------------ in-process

def test_keys_file_is_read_again_when_it_changes_and_kept_when_unreadable(tmp_path):
    path = tmp_path / "keys"
    path.write_text("one\n# a comment\n\n  two  \n")
    keys = ApiKeys([], str(path))
    assert keys.enabled and keys.accepts("Bearer one") and keys.accepts("bearer two")
    assert not keys.accepts("Bearer # a comment") and not keys.accepts("Bearer ")
    path.write_text("three\n")
    assert keys.accepts("Bearer three") and not keys.accepts("Bearer one")
    path.unlink()  # being replaced: the keys last read still hold, the door stays shut
    assert keys.accepts("Bearer three") and not keys.accepts(None)
    assert not ApiKeys([]).enabled


def test_without_keys_nothing_is_asked_and_metrics_are_open_by_default():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["path"])

    async def call(middleware, path):
        sent = []

        async def send(message):
            sent.append(message)
        await middleware({"type": "http", "path": path, "headers": []}, None, send)
        return sent

    def run(coroutine):  # in a thread of its own: the browser tests leave a loop running here
        with ThreadPoolExecutor(1) as thread:
            return thread.submit(asyncio.run, coroutine).result()

    open_door = RequireApiKey(app, ApiKeys([]))
    run(call(open_door, "/generate"))
    keyed_default = RequireApiKey(app, ApiKeys(["k"]))
    run(call(keyed_default, "/metrics"))
    sent = run(call(keyed_default, "/info"))
    assert seen == ["/generate", "/metrics"]
    assert sent[0]["status"] == 401
    assert json.loads(sent[1]["body"])["error"] == "Unauthorized"


@pytest.mark.parametrize("value,keys", [
    ("k1,k2", ["k1", "k2"]), (" k1 , k2 ,", ["k1", "k2"]), ('["k1", "k2"]', ["k1", "k2"]),
    ("[]", []), ("", []),
])
def test_api_keys_are_comma_separated_or_a_json_list(monkeypatch, value, keys):
    from bentosvd.config import Settings

    monkeypatch.setenv("API_KEYS", value)
    monkeypatch.setenv("WEBHOOK_ALLOWED_HOSTS", value)
    settings = Settings()
    assert settings.api_keys == keys and settings.webhook_allowed_hosts == keys
