"""The batch CLI's failures, run as users run it (`python -m bentosvd.client.cli ...` in a
subprocess): one paragraph on stderr (`error: ...`, then how to see the traceback) and a
non-zero exit, never a traceback unless `--debug` or BENTOSVD_DEBUG=1 asks for one.

Exit codes as `main` documents them: 2 for a server that cannot be reached (and for mistakes
in the command line), 1 for any other failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, make_image

HINT = "(--debug or BENTOSVD_DEBUG=1 shows the traceback)"


def cli(*args, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items()
            if k not in {"BENTOSVD_DEBUG", "BENTOSVD_URL", "BENTOSVD_API_KEY", "BENTOSVD_TOKEN"}}
    return subprocess.run([sys.executable, "-m", "bentosvd.client.cli", *map(str, args)], cwd=ROOT,
                          env={**full, **env}, capture_output=True, text=True, timeout=120)


def assert_one_paragraph(result: subprocess.CompletedProcess, code: int, *phrases: str) -> str:
    """Exit `code`; on stderr the message and the --debug hint, nothing else."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1] == HINT, result.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


def assert_traceback(result: subprocess.CompletedProcess, code: int, *phrases: str) -> None:
    """--debug / BENTOSVD_DEBUG=1: the same exit code and message, after the traceback."""
    assert result.returncode == code, result.stderr
    assert "Traceback (most recent call last)" in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and HINT not in result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, (phrase, result.stderr)


class StandIn:
    """A server that answers `GET /readyz` 200 and every `POST /generate` with one answer."""

    def __init__(self, status: int, body: bytes, content_type: str):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self._answer(200, b"", "text/plain")

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self._answer(status, body, content_type)

            def _answer(self, code, data, kind):
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stand_in():
    servers = []

    def start(status: int, body: bytes, content_type: str = "application/json") -> StandIn:
        servers.append(StandIn(status, body, content_type))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def image(tmp_path) -> Path:
    (tmp_path / "images").mkdir()
    return make_image(tmp_path / "images" / "cat.png", size=(64, 64))


@pytest.mark.parametrize("command", ["generate", "batch"])
def test_an_unreachable_server(tmp_path, image, command):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = [image] if command == "generate" else [image.parent, tmp_path / "videos"]
    result = cli(command, *args, "--url", url)
    assert_one_paragraph(result, 2, f"cannot reach the server at {url}", "ConnectError", "BENTOSVD_URL")
    assert not (tmp_path / "videos").exists() and not image.with_suffix(".mp4").exists()

    # The traceback goes down to httpx's connection error.
    assert_traceback(cli(command, *args, "--url", url, BENTOSVD_DEBUG="1"), 2,
                     "httpx.ConnectError", f"error: cannot reach the server at {url}")
    assert_traceback(cli(command, *args, "--url", url, "--debug"), 2, "httpx.ConnectError")


@pytest.mark.parametrize("status", [404, 500])
def test_an_error_answer(stand_in, image, status):
    body = json.dumps({"error": "x", "message": f"the server says no ({status})",
                       "fix": "ask nicely"}).encode()
    server = stand_in(status, body)
    result = cli("generate", image, "--url", server.url, "--retries", 0)
    message = assert_one_paragraph(result, 1, f"HTTP {status}: the server says no ({status})",
                                   "(fix: ask nicely)")
    assert message == f"error: HTTP {status}: the server says no ({status}) (fix: ask nicely)"
    assert not image.with_suffix(".mp4").exists()
    assert_traceback(cli("generate", image, "--url", server.url, "--retries", 0, "--debug"), 1,
                     "GenerationFailed: HTTP")


def test_a_video_that_cannot_be_written(stand_in, image, tmp_path):
    """The server answers with a video; the output path goes through a file, not a folder."""
    server = stand_in(200, b"video bytes", "video/mp4")
    (tmp_path / "a_file").write_text("not a folder")
    output = tmp_path / "a_file" / "cat.mp4"
    result = cli("generate", image, "--url", server.url, "-o", output)
    assert_one_paragraph(result, 1, f"cannot write {output}")
    assert_traceback(cli("generate", image, "--url", server.url, "-o", output, BENTOSVD_DEBUG="1"),
                     1, "Error: [Errno")


@pytest.mark.parametrize("url, what", [
    ("http://[::1", "InvalidURL: "),  # httpx refuses it when the client is made
    ("http://127.0.0.1:99999", "OverflowError: "),  # the socket refuses it, inside a task group
])
def test_an_unexpected_error_is_one_paragraph_too(image, url, what):
    """Nothing the commands expect: still the one paragraph (the innermost error's type and
    text, not the task group around it), exit 1; the traceback with --debug."""
    result = cli("generate", image, "--url", url)
    assert_one_paragraph(result, 1, what)
    assert "ExceptionGroup" not in result.stderr
    assert_traceback(cli("generate", image, "--url", url, "--debug"), 1, what)


def test_a_mistyped_path_is_one_line(tmp_path):
    """A mistake in the command line itself: one line, exit 2, no exception to show."""
    result = cli("generate", tmp_path / "no-such.png", "--url", "http://127.0.0.1:9")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: no such image: {tmp_path / 'no-such.png'}"
    result = cli("batch", tmp_path / "no-such-folder", tmp_path / "videos")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: no such folder: {tmp_path / 'no-such-folder'}"
