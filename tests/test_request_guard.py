"""RequestGuard: the checks in front of `POST /generate`.

The same table of bad requests runs twice: against the middleware around a tiny ASGI app
(fast, and shows what the app sees), and against one real `bentoml serve` whose service
wires the guard. That server's outgoing HTTP goes through a counting proxy, so a request
that made BentoML download its `img` URL would show up there.
"""

from __future__ import annotations

import asyncio
import http.server
import importlib.util
import json
import os
import shlex
import socket
import subprocess
import threading
from urllib.parse import urlparse

import bentoml
import httpx
import pytest

from bentosvd.api.guard import AnswerErrors, JsonField, RequestGuard, json_depth
from bentosvd.config import Params, Settings
from tests.conftest import ROOT
from tests.test_service import BLOG_CURL

URL = "http://images.example/cat.png"  # never resolved: only the counting proxy sees it
B = "guardboundary"
MULTIPART = f"multipart/form-data; boundary={B}"
IMG = ("img", "cat.png", b"\x89PNG not really")
PARAMS = ("params", None, b'{"seed": 1}')
MAX_UPLOAD = 2 * 2**20
CAP = MAX_UPLOAD + 64 * 1024  # as service.py wires it
LIMITS = Settings()
PARAMS_FIELD = JsonField(Params, max_bytes=LIMITS.max_params_bytes,
                         max_depth=LIMITS.max_params_depth, max_digits=LIMITS.max_number_digits)


def form(*parts: tuple[str, str | None, bytes], boundary: str = B) -> bytes:
    """A multipart/form-data body; a part with a filename is a file, as curl's -F 'x=@f'."""
    out = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


# content type, body, status, field named in the answer (None: no field applies)
REFUSED = [
    pytest.param(MULTIPART, form(PARAMS), 400, "img", id="no img"),
    pytest.param(MULTIPART, form(("img", None, URL.encode())), 400, "img", id="img is a URL string"),
    pytest.param(MULTIPART, form(IMG, ("img", None, URL.encode())), 400, "img", id="img file and img URL"),
    pytest.param(MULTIPART, form(IMG, IMG), 400, "img", id="two img files"),
    pytest.param(MULTIPART, form(IMG, PARAMS, PARAMS), 400, "params", id="params twice"),
    pytest.param(MULTIPART, form(IMG, ("picture", "a.png", b"x")), 400, "picture", id="unknown file field"),
    pytest.param(MULTIPART, form(IMG, ("image", "a.png", b"x")), 400, "img", id="img and the upstream image"),
    pytest.param(MULTIPART, form(("image", None, URL.encode())), 400, "img", id="upstream image as a URL"),
    pytest.param(MULTIPART, form(IMG, ("seed", None, b"[1]")), 400, "seed", id="upstream seed not a number"),
    pytest.param(MULTIPART, form(IMG, ("url", None, URL.encode())), 400, "url", id="unknown text field"),
    pytest.param(MULTIPART, b"this is not multipart", 400, None, id="malformed body"),
    pytest.param(MULTIPART, form(IMG)[:-12], 400, None, id="body cut before closing boundary"),
    pytest.param(MULTIPART, form(IMG, boundary="other"), 400, None, id="wrong boundary"),
    pytest.param(MULTIPART, f"--{B}\r\nContent-Disposition: form-data\r\n\r\nx\r\n--{B}--\r\n".encode(),
                 400, None, id="part without a name"),
    pytest.param(MULTIPART, form(("img", "x" * 300 + ".png", b"x")), 400, "img", id="300-byte file name"),
    pytest.param("application/json", json.dumps({"img": URL}).encode(), 415, None, id="JSON img URL"),
    pytest.param("text/plain", URL.encode(), 415, None, id="text/plain"),
    pytest.param("application/octet-stream", b"\x89PNG", 415, None, id="octet-stream"),
    pytest.param("application/x-www-form-urlencoded", f"img={URL}".encode(), 415, None, id="urlencoded"),
    pytest.param("multipart/form-data", form(IMG), 415, None, id="multipart without boundary"),
    pytest.param(None, b"", 415, None, id="no content type"),
    # params that Python's json module or BentoML's parsing would turn into a 500
    *[pytest.param(MULTIPART, form(IMG, ("params", filename, value)), status, field, id=name)
      for filename in (None, "params.json") for name, value, status, field in [
        ("number of 5000 digits", b'{"seed": ' + b"9" * 5000 + b"}", 400, "params"),
        ("float of 400 digits", b'{"cond_aug": 1' + b"0" * 400 + b".5}", 400, "params"),
        ("list 5000 deep", b'{"seed": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "params"),
        ("object 2000 deep", b'{"a":' * 2000 + b"1" + b"}" * 2000, 400, "params"),
        ("list 5 deep", b'{"seed": [[[[1]]]]}', 400, "params"),
        ("1.5 MiB string", b'{"format": "' + b"x" * (3 * 2**19) + b'"}', 413, "params"),
        ("over max_params_bytes", b'{"format": "' + b"x" * LIMITS.max_params_bytes + b'"}', 413,
         "params"),
        ("not UTF-8", b'{"format": "\xff\xfe"}', 400, "params"),
        ("UTF-16", '{"seed": 1}'.encode("utf-16"), 400, "params"),
        ("NaN", b'{"cond_aug": NaN}', 400, "params"),
        ("Infinity", b'{"cond_aug": -Infinity}', 400, "params"),
        ("not JSON", b"{seed: 1}", 400, "params"),
        ("empty", b"", 400, "params"),
        ("JSON null", b"null", 400, "params"),
        ("a list", b"[1, 2]", 400, "params"),
        ("out of bounds", b'{"fps_id": 99}', 400, "params.fps_id"),
        ("nested in a field", b'{"seed": {"a": 1}}', 400, "params.seed"),
        ("unknown param", b'{"sed": 1}', 400, "params.sed"),
      ] if filename is None or "deep" in name or "digits" in name],
]


def assert_error(status: int, headers, body: bytes, expected: int, field: str | None) -> dict:
    assert status == expected, body
    assert headers["content-type"] == "application/json"
    answer = json.loads(body)
    assert set(answer) >= {"error", "message", "fix"}, answer
    assert answer.get("field") == field, answer
    if b"URL" in body:
        assert "not fetched" in answer["message"] and "img=@" in answer["fix"]
    return answer


# --- the middleware around a tiny ASGI app ---------------------------------------------

class Call:
    """One request through RequestGuard to a recording app, driven by hand: `chunks` arrive
    one per receive(), then the client disconnects."""

    def __init__(self, content_type: str | None, chunks: list[bytes], *, method="POST",
                 path="/generate", content_length: int | None = None, cap: int = 1024):
        headers = [(b"content-type", content_type.encode())] if content_type else []
        if content_length is not None:
            headers.append((b"content-length", str(content_length).encode()))
        self.scope = {"type": "http", "method": method, "path": path, "headers": headers}
        self.chunks, self.reads, self.sent = list(chunks), 0, []
        self.app_body: bytes | None = None
        self.app_receive = self.app_next = None
        guard = RequestGuard(self.app, max_body_bytes=cap, body_timeout=60,
                             json_fields={"params": PARAMS_FIELD})
        asyncio.run(guard(self.scope, self.receive, self.send))

    async def receive(self):
        self.reads += 1
        if not self.chunks:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": self.chunks.pop(0), "more_body": bool(self.chunks)}

    async def send(self, message):
        self.sent.append(message)

    async def app(self, scope, receive, send):
        self.app_receive, body = receive, b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.app_body, self.app_next = body, await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    @property
    def status(self) -> int:
        return self.sent[0]["status"]

    def answer(self, expected: int, field: str | None) -> dict:
        assert self.app_body is None, "a refused request must not reach the app"
        headers = {k.decode(): v.decode() for k, v in self.sent[0]["headers"]}
        return assert_error(self.status, headers, self.sent[1]["body"], expected, field)


@pytest.mark.parametrize("content_type, body, status, field", REFUSED)
def test_guard_refuses(content_type, body, status, field):
    Call(content_type, [body], cap=CAP).answer(status, field)


@pytest.mark.parametrize("text, depth", [
    ("1", 0), ("{}", 1), ('{"a": [1, {"b": []}]}', 4), ('{"a": "[[[[{{{"}', 1),
    ('{"a": "\\"[[["}', 1), ('["\\\\", [[]]]', 3)])
def test_json_depth_skips_strings_and_escapes(text, depth):
    assert json_depth(text) == depth


@pytest.mark.parametrize("parts", [
    pytest.param((IMG,), id="img only"),
    pytest.param((IMG, PARAMS), id="img and params"),
    pytest.param((PARAMS, IMG), id="params first"),
])
@pytest.mark.parametrize("chunk", [1, 7, 10_000], ids=lambda n: f"{n}-byte chunks")
def test_guard_passes_the_exact_bytes_on(parts, chunk):
    body = form(*parts)
    call = Call(f'multipart/form-data; boundary="{B}"', [body[i:i + chunk] for i in range(0, len(body), chunk)])
    assert call.status == 200
    assert call.app_body == body
    assert call.app_next == {"type": "http.disconnect"}  # the app still sees the client leave


def test_content_length_over_cap_is_refused_before_reading():
    call = Call(MULTIPART, [b"x" * 2000], content_length=2000)
    call.answer(413, "img")
    assert call.reads == 0


def test_chunked_body_stops_once_over_cap():
    call = Call(MULTIPART, [b"x" * 300] * 10)  # no Content-Length: 3000 bytes against 1024
    call.answer(413, "img")
    assert call.reads == 4  # the fourth chunk passes the cap; the rest is never read


def test_wrong_content_type_is_refused_before_reading():
    call = Call("application/json", [b"{}"], content_length=2)
    call.answer(415, None)
    assert call.reads == 0


def test_client_leaving_mid_body_gets_no_answer():
    call = Call(MULTIPART, [])  # the first receive() is already the disconnect
    assert call.sent == [] and call.app_body is None


@pytest.mark.parametrize("method, path", [
    ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/docs.json"), ("GET", "/"),
    ("GET", "/generate"), ("POST", "/other"),
])
def test_other_requests_pass_through_unbuffered(method, path):
    call = Call("text/plain", [b"anything"], method=method, path=path)
    assert call.status == 200 and call.app_receive == call.receive


# --- one real server with the guard wired in -------------------------------------------

class CountingProxy(http.server.ThreadingHTTPServer):
    """An HTTP proxy that answers 404 to everything and counts what it was asked for."""

    def __init__(self):
        self.requests: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                proxy.requests.append(self.requestline)
                self.send_response(404)
                self.send_header("content-length", "0")
                self.end_headers()

            do_CONNECT = do_HEAD = do_POST = do_GET

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)


# --- AnswerErrors: a handler that raises still answers at once ----------------------------

def through_answer_errors(path: str, app) -> tuple[list[dict], BaseException | None]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "headers": []}
    try:
        asyncio.run(AnswerErrors(app)(scope, receive, send))
    except Exception as e:
        return sent, e
    return sent, None


async def raises_timeout(scope, receive, send):  # BentoML's /readyz, a worker's probe unanswered
    raise asyncio.TimeoutError()


@pytest.mark.parametrize("path, status, retry_after, message", [
    ("/readyz", 503, "5", "a GPU worker did not answer its readiness probe in time"),
    ("/generate", 500, None, "the server failed on this request"),
])
def test_a_handler_that_raises_before_answering_gets_a_json_error(path, status, retry_after,
                                                                  message):
    sent, error = through_answer_errors(path, raises_timeout)
    assert error is None
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    assert (sent[0]["status"], headers.get("retry-after")) == (status, retry_after)
    assert json.loads(sent[1]["body"])["message"].startswith(message)


def test_a_handler_that_raises_after_answering_is_left_to_the_server():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("mid-body")

    sent, error = through_answer_errors("/generate", app)
    assert [m["type"] for m in sent] == ["http.response.start"]  # no second start
    assert isinstance(error, RuntimeError)


@pytest.fixture(scope="module")
def proxy():
    proxy = CountingProxy()
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    yield proxy
    proxy.shutdown()


@pytest.fixture(scope="module")
def guarded(server_factory, proxy, tmp_path_factory):
    proxy_url = f"http://127.0.0.1:{proxy.server_address[1]}"
    pythonpath = str(ROOT)
    if importlib.util.find_spec("uvloop") is None:
        # BentoML's URL download imports uvloop for its private-address check; without it
        # the download crashes before connecting, and a fetch could never show up. This
        # stand-in lets it connect, as it does where uvloop is installed.
        shim = tmp_path_factory.mktemp("uvloop_shim")
        (shim / "uvloop.py").write_text(
            "import asyncio\nLoop = asyncio.BaseEventLoop\nnew_event_loop = asyncio.new_event_loop\n"
            "EventLoopPolicy = asyncio.DefaultEventLoopPolicy\ndef install(): pass\n")
        pythonpath += os.pathsep + str(shim)
    server = server_factory(
        BENTOML_CONFIG=str(ROOT / "bentoml_configuration.yaml"), MAX_UPLOAD_BYTES=str(MAX_UPLOAD),
        PYTHONPATH=pythonpath, HTTP_PROXY=proxy_url, http_proxy=proxy_url,
        HTTPS_PROXY=proxy_url, https_proxy=proxy_url,
        NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",  # the API → worker calls
    )
    yield server
    server.stop()


@pytest.mark.parametrize("content_type, body, status, field", REFUSED)
def test_server_refuses(guarded, proxy, content_type, body, status, field):
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(f"{guarded.url}/generate", content=body, headers=headers, timeout=30)
    assert_error(response.status_code, response.headers, response.content, status, field)
    assert proxy.requests == []


def test_blog_curl(guarded, proxy, test_image, tmp_path):
    (tmp_path / "test_image.png").write_bytes(test_image.read_bytes())
    command = BLOG_CURL.replace("localhost:3000", f"127.0.0.1:{guarded.port}")
    result = subprocess.run(
        shlex.split(command.replace("\\\n", " ")) + ["-sS", "-w", "%{http_code} %{content_type}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.stdout == "200 video/mp4", (result.stdout, result.stderr)
    assert (tmp_path / "generated_video.mp4").read_bytes()[4:8] == b"ftyp"


def test_sync_http_client(guarded, test_image):
    with bentoml.SyncHTTPClient(guarded.url, timeout=120) as client:
        video = client.generate(img=test_image, params={"seed": 3})
    assert video.read_bytes()[4:8] == b"ftyp"


def test_sync_http_client_with_url_is_refused_not_fetched(guarded, proxy):
    """Given a string for `img`, the client sends an urlencoded form, which BentoML parses
    like multipart and whose `img` it would download."""
    with bentoml.SyncHTTPClient(guarded.url, timeout=30) as client:
        with pytest.raises(bentoml.exceptions.BentoMLException) as error:
            client.generate(img=URL)
    assert error.value.error_code == 415 and "not fetched" in str(error.value)
    assert proxy.requests == []


def test_server_content_length_over_cap_answered_without_the_body(guarded):
    url = urlparse(guarded.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as s:
        s.sendall(f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: {MULTIPART}\r\n"
                  f"Content-Length: {10 * 2**30}\r\n\r\n".encode())  # 10 GiB announced, none sent
        reply = b""
        while b"}" not in reply:
            reply += s.recv(65536) or b"}"
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply
    assert json.loads(body)["error"] == "PayloadTooLarge"


def test_server_chunked_body_over_cap(guarded):
    sent = []

    def chunks():
        while sum(sent) < CAP + 2**20:
            sent.append(64 * 1024)
            yield b"x" * sent[-1]

    response = httpx.post(f"{guarded.url}/generate", content=chunks(), timeout=30,
                          headers={"content-type": MULTIPART})  # a generator: chunked, no length
    assert_error(response.status_code, response.headers, response.content, 413, "img")


def test_server_upload_at_the_limit_reaches_the_service(guarded):
    """The guard's cap leaves room for the form around an image of MAX_UPLOAD_BYTES, so the
    service gives its own answer about the image (here: not an image)."""
    response = httpx.post(f"{guarded.url}/generate", timeout=30,
                          files={"img": ("big.png", b"x" * MAX_UPLOAD, "image/png")})
    assert response.status_code == 400 and response.json()["error"] == "InvalidImage"


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/readyz", 200), ("GET", "/livez", 200), ("GET", "/metrics", 200),
    ("GET", "/docs.json", 200), ("GET", "/", 200), ("GET", "/generate", 405),
])
def test_server_other_requests_unaffected(guarded, method, path, status):
    assert httpx.request(method, f"{guarded.url}{path}", timeout=30).status_code == status


def test_server_survived(guarded):
    """Nothing above crashed a worker: the log has no traceback."""
    assert "Traceback" not in guarded.log.read_text(errors="replace")
