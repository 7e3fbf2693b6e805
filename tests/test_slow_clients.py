"""Slow and stuck clients (the body deadline in bentosvd/api/guard.py) against a real server:
50 connections trickle their uploads a byte a second while a normal request is served,
/livez keeps answering, and each trickler gets 408 at UPLOAD_TIMEOUT with its connection
closed."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx

from tests.test_service import DEMO, assert_video, post

TRICKLERS = 50
UPLOAD_TIMEOUT = 8


def open_trickle(server) -> socket.socket:
    """A POST /generate that promises a 1 MB body and then sends nothing more."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: multipart/form-data; boundary=b\r\n"
                 b"Content-Length: 1000000\r\n\r\n--b\r\n")
    return sock


def test_trickled_uploads_get_408_and_hold_up_nobody(start_server, test_image):
    server = start_server(UPLOAD_TIMEOUT=str(UPLOAD_TIMEOUT))
    sockets = [open_trickle(server) for _ in range(TRICKLERS)]
    opened = time.monotonic()
    stop = threading.Event()

    def trickle():
        # A byte a second on every connection, until shortly before the deadline: a byte
        # arriving after the server has answered and closed would make its kernel reset
        # the connection, and the reset can drop the answer before it is read here.
        while not stop.wait(1.0) and time.monotonic() - opened < UPLOAD_TIMEOUT - 2:
            for sock in sockets:
                try:
                    sock.send(b"x")
                except OSError:
                    pass

    live = []

    def probe():
        while not stop.is_set():
            live.append(httpx.get(f"{server.url}/livez", timeout=30).status_code)
            time.sleep(0.2)

    threads = [threading.Thread(target=trickle), threading.Thread(target=probe)]
    for thread in threads:
        thread.start()
    try:
        response = post(server, test_image, {"seed": 1})
        served = time.monotonic() - opened
        assert response.status_code == 200, response.text
        assert_video(response.content, frames=DEMO.num_frames, fps=7, size=(DEMO.width, DEMO.height))
        # Served while the tricklers still held their connections: it waited for none.
        assert served < UPLOAD_TIMEOUT, served
        answers = []
        for sock in sockets:
            sock.settimeout(60)
            data = b""
            while chunk := sock.recv(65536):  # until the server closes the connection
                data += chunk
            answers.append(data)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        for sock in sockets:
            sock.close()
    for data in answers:
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), data[:300]
        assert b"connection: close" in head.lower()
        error = json.loads(body)
        assert error["error"] == "RequestTimeout" and f"within {UPLOAD_TIMEOUT} s" in error["message"]
    assert live and set(live) == {200}, live
    assert post(server, test_image, {"seed": 2}).status_code == 200
