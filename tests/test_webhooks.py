"""Webhooks (bentosvd/api/webhooks.py) against a real server and real HTTP listeners on
loopback: signed deliveries arrive in order and verify, a failing delivery is retried, a
redirect is not followed, and a host that is not allowed is never contacted."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from bentosvd.api.webhooks import Destinations
from bentosvd.errors import InvalidRequest
from tests.test_jobs import wait_finished

SECRET = "whsec_" + base64.b64encode(b"a test key of 32 bytes, exactly.").decode()


class Listener:
    """An HTTP server on loopback that records each POST; `answers` is the status for each
    request in turn (then 200), `redirect` a Location for 3xx answers."""

    def __init__(self, answers=(), redirect: str | None = None):
        self.received: list[dict] = []
        self.answers = list(answers)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.received.append({"headers": {k.lower(): v for k, v in self.headers.items()},
                                       "body": body, "at": time.monotonic()})
                status = outer.answers.pop(0) if outer.answers else 200
                self.send_response(status)
                if redirect:
                    self.send_header("Location", redirect)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[str]:
        return [json.loads(r["body"])["type"] for r in self.received]

    def close(self):
        self.server.shutdown()


def verify(secret: str, request: dict) -> dict:
    """Standard Webhooks verification, written from the spec: the signed content is
    "<webhook-id>.<webhook-timestamp>.<body>", HMAC-SHA256 with the secret's base64 key."""
    headers = request["headers"]
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + request["body"]
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    versions = dict(sig.split(",", 1) for sig in headers["webhook-signature"].split())
    assert hmac.compare_digest(versions["v1"], expected), "the signature does not verify"
    assert abs(time.time() - int(headers["webhook-timestamp"])) < 300
    return json.loads(request["body"])


@pytest.fixture(scope="module")
def hooked(module_server):
    return module_server(WEBHOOK_ALLOWED_HOSTS="127.0.0.1", WEBHOOK_SECRET=SECRET,
                          WEBHOOK_MAX_ATTEMPTS="4")


def submit(server, image, params: dict, webhook: dict | None) -> httpx.Response:
    data = {"params": json.dumps(params)}
    if webhook is not None:
        data["webhook"] = json.dumps(webhook)
    return httpx.post(f"{server.url}/jobs", files={"img": image.read_bytes()}, data=data, timeout=60)


def wait_events(listener: Listener, last: str, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while last not in listener.events():
        assert time.monotonic() < deadline, listener.events()
        time.sleep(0.1)
    return listener.events()


def test_signed_deliveries_arrive_in_order_and_verify(hooked, test_image):
    listener = Listener()
    try:
        job = submit(hooked, test_image, {"seed": 1, "num_inference_steps": 20},
                     {"url": listener.url}).json()
        final, _ = wait_finished(hooked, job["id"])
        events = wait_events(listener, "job.completed")
    finally:
        listener.close()
    assert events[0] == "job.queued" and events[-1] == "job.completed", events
    assert set(events[1:-1]) == {"job.progress"} and events[1:-1], events
    payloads = [verify(SECRET, r) for r in listener.received]
    assert payloads[-1]["data"]["status"] == "succeeded" and payloads[-1]["data"]["id"] == job["id"]
    steps = [p["data"]["step"] for p in payloads[1:-1]]
    assert steps == sorted(steps)
    # Progress at most every 500 ms (as made: a delivery may wait on the one before it).
    times = [p["timestamp"] for p in payloads if p["type"] == "job.progress"]
    assert all(b - a >= 0.49 for a, b in zip(times, times[1:])), times
    assert len({r["headers"]["webhook-id"] for r in listener.received}) == len(events)


def test_a_failing_delivery_is_retried_and_events_can_be_chosen(hooked, test_image):
    listener = Listener(answers=[500, 503])
    try:
        job = submit(hooked, test_image, {"seed": 2}, {"url": listener.url, "events": ["completed"]}).json()
        wait_finished(hooked, job["id"])
        deadline = time.monotonic() + 30  # retried after 1 s, then 2 s
        while len(listener.received) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)  # nothing more comes once one was delivered
    finally:
        listener.close()
    assert listener.events() == ["job.completed"] * 3  # 500, 503, then delivered
    ids = {r["headers"]["webhook-id"] for r in listener.received}
    assert len(ids) == 1  # one delivery, retried: the same id each time
    gaps = [b["at"] - a["at"] for a, b in zip(listener.received, listener.received[1:])]
    assert gaps[1] > gaps[0]  # backing off


def test_redirects_are_not_followed(hooked, test_image):
    elsewhere = Listener()
    redirecting = Listener(answers=[302] * 10, redirect=elsewhere.url)
    try:
        job = submit(hooked, test_image, {"seed": 3}, {"url": redirecting.url, "events": ["completed"]}).json()
        wait_finished(hooked, job["id"])
        deadline = time.monotonic() + 30
        while len(redirecting.received) < 4 and time.monotonic() < deadline:  # WEBHOOK_MAX_ATTEMPTS
            time.sleep(0.2)
    finally:
        redirecting.close()
        elsewhere.close()
    assert len(redirecting.received) == 4 and elsewhere.received == []


@pytest.mark.parametrize("url,why", [
    ("http://localhost:{port}/hook", "localhost is not in WEBHOOK_ALLOWED_HOSTS"),
    ("http://127.0.0.2:{port}/hook", "127.0.0.2 is not in WEBHOOK_ALLOWED_HOSTS"),
    ("ftp://127.0.0.1:{port}/hook", "http:// or https://"),
    ("http://user:pw@127.0.0.1:{port}/hook", "credentials"),
])
def test_a_host_not_allowed_is_refused_at_submit_and_never_contacted(hooked, test_image, url, why):
    listener = Listener()
    try:
        port = listener.server.server_port
        response = submit(hooked, test_image, {"seed": 4}, {"url": url.format(port=port)})
        assert response.status_code == 400, response.text
        body = response.json()
        assert why in body["message"] and body["field"] == "webhook.url", body
        assert "WEBHOOK_ALLOWED_HOSTS" in body["fix"]
        time.sleep(1)
    finally:
        listener.close()
    assert listener.received == []


def test_webhooks_are_off_by_default(server, test_image):
    response = submit(server, test_image, {"seed": 5}, {"url": "http://127.0.0.1:9/hook"})
    assert response.status_code == 400
    assert "WEBHOOK_ALLOWED_HOSTS is empty" in response.json()["message"]


def test_a_name_that_resolves_to_a_private_address_needs_that_address_listed():
    only_name = Destinations(["localhost"])
    with pytest.raises(InvalidRequest, match="resolves to 127.0.0.1, a non-public address"):
        only_name.check("http://localhost:8080/hook")
    assert Destinations(["localhost", "127.0.0.0/8"]).check("http://localhost:8080/x")[1:] == ("127.0.0.1", 8080)
    with pytest.raises(InvalidRequest, match="not in WEBHOOK_ALLOWED_HOSTS"):
        Destinations(["10.0.0.0/8"]).check("http://169.254.169.254/latest/meta-data")
