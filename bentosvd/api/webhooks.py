"""Webhooks: an async job may name a URL that is told when it is queued, how far it is, and
how it ended, so a client need not poll.

A delivery is a POST of `{"type": "job.<event>", "timestamp": ..., "data": <the job's
JSON>}`, signed as Standard Webhooks (the layout Replicate uses) say: headers `webhook-id`
(the same on every retry of one delivery), `webhook-timestamp` (Unix seconds) and
`webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`, keyed with
WEBHOOK_SECRET (`whsec_<base64 key>`). A delivery that fails is retried with exponential
backoff, each job's deliveries in order; none ever holds up a generation.

No server-side request forgery: only hosts in WEBHOOK_ALLOWED_HOSTS (empty by default:
webhooks off) are ever contacted. A host that resolves to a loopback, link-local, private
or otherwise non-public address is refused unless that address (or a network holding it)
is listed too, checked at submission and again before every delivery, which connects to
the address it checked. Redirects are never followed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
import uuid
from typing import Literal
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field

from bentosvd.errors import InvalidRequest

logger = logging.getLogger("bentoml.svd")

Event = Literal["queued", "progress", "completed", "failed", "cancelled"]
EVENTS: tuple[str, ...] = Event.__args__
PROGRESS_INTERVAL = 0.5  # seconds between two progress deliveries of one job, at least
SETTING = "WEBHOOK_ALLOWED_HOSTS"


class WebhookSpec(BaseModel):
    """The `webhook` form field of POST /jobs."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2048, description="http(s) URL on a host the operator allowed")
    events: list[Event] = Field(list(EVENTS), description="which events to deliver")


def signing_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret (a secret without the prefix is used as is)."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[len("whsec_"):])
    return secret.encode()


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class Destinations:
    """Which webhook URLs may be contacted: WEBHOOK_ALLOWED_HOSTS, each a host name, an
    address or a network (`10.0.0.0/8`)."""

    def __init__(self, allowed: list[str]):
        self.names: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in allowed:
            try:
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self.names.add(entry.lower().rstrip("."))

    @property
    def enabled(self) -> bool:
        return bool(self.names or self.networks)

    def _listed_address(self, address) -> bool:
        return any(address in network for network in self.networks)

    def check(self, url: str) -> tuple[str, str, int]:
        """(scheme, the address to connect to, port), or InvalidRequest saying why not."""
        def refuse(why: str):
            return InvalidRequest(f"webhook URL refused: {why}", field="webhook.url",
                                  fix=f"use a host the server's operator listed in {SETTING}")
        if not self.enabled:
            raise InvalidRequest(f"webhooks are off on this server ({SETTING} is empty)",
                                 field="webhook", fix=f"poll GET /jobs/<id>, or ask the operator "
                                 f"to set {SETTING}")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise refuse("it must be an http:// or https:// URL with a host")
        if parts.username or parts.password:
            raise refuse("credentials in the URL are not allowed")
        host = parts.hostname.lower().rstrip(".")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            if not self._listed_address(literal):
                raise refuse(f"{host} is not in {SETTING}")
            return parts.scheme, host, port
        if host not in self.names:
            raise refuse(f"{host} is not in {SETTING}")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise refuse(f"{host} does not resolve ({e})") from None
        addresses = {ipaddress.ip_address(info[4][0]) for info in infos}
        for address in addresses:
            if not address.is_global and not self._listed_address(address):
                raise refuse(f"{host} resolves to {address}, a non-public address not "
                             f"listed in {SETTING}")
        return parts.scheme, str(sorted(addresses, key=str)[0]), port


class Webhooks:
    """Delivers the events of jobs that asked for them, each job's in order."""

    def __init__(self, allowed: list[str], secret: str | None, *, max_attempts: int,
                 timeout: float = 10.0):
        self.destinations = Destinations(allowed)
        self.key = signing_key(secret) if secret else None
        self.max_attempts, self.timeout = max_attempts, timeout
        self._queues: dict[str, asyncio.Queue] = {}
        self._last_progress: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()

    def validate(self, spec: WebhookSpec) -> None:
        """At submission: a 400 for a webhook this server will not deliver."""
        self.destinations.check(spec.url)
        if self.key is None:
            raise InvalidRequest("webhooks are off on this server (WEBHOOK_SECRET is not set, "
                                 "so deliveries could not be signed)", field="webhook",
                                 fix="poll GET /jobs/<id>, or ask the operator to set WEBHOOK_SECRET")

    def notify(self, job_id: str, spec: dict | None, event: str, data: dict) -> None:
        """Queue `event` for delivery if the job asked for it; returns at once."""
        if not spec or event not in spec.get("events", EVENTS) or self.key is None:
            return
        now = time.monotonic()
        if event == "progress":
            if now - self._last_progress.get(job_id, 0.0) < PROGRESS_INTERVAL:
                return
            self._last_progress[job_id] = now
        body = json.dumps({"type": f"job.{event}", "timestamp": time.time(), "data": data}).encode()
        queue = self._queues.get(job_id)
        if queue is None:
            queue = self._queues[job_id] = asyncio.Queue()
            task = asyncio.create_task(self._deliver_all(job_id, spec["url"], queue))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        queue.put_nowait((event, body))

    async def _deliver_all(self, job_id: str, url: str, queue: asyncio.Queue) -> None:
        try:
            while True:
                event, body = await queue.get()
                if event == "progress" and any(e == "progress" for e, _ in queue._queue):
                    continue  # a newer progress is waiting: only the latest is worth sending
                await self._deliver(job_id, url, event, body)
                if event in ("completed", "failed", "cancelled"):
                    return
        finally:
            self._queues.pop(job_id, None)
            self._last_progress.pop(job_id, None)

    async def _deliver(self, job_id: str, url: str, event: str, body: bytes) -> bool:
        message_id = f"msg_{uuid.uuid4().hex}"
        delay = 1.0
        for attempt in range(1, self.max_attempts + 1):
            problem = await self._send(url, message_id, body)
            if problem is None:
                return True
            if attempt == self.max_attempts:
                break
            logger.info("webhook %s of job %s: %s; retrying in %.0f s", event, job_id, problem, delay)
            await asyncio.sleep(delay)
            delay *= 2
        logger.warning("webhook %s of job %s not delivered after %d attempts: %s", event, job_id,
                       self.max_attempts, problem)
        return False

    async def _send(self, url: str, message_id: str, body: bytes) -> str | None:
        """None when delivered (a 2xx), else what went wrong."""
        try:
            scheme, address, port = await asyncio.to_thread(self.destinations.check, url)
        except InvalidRequest as e:
            return e.message  # e.g. the name now resolves to a private address
        timestamp = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": message_id,
                   "webhook-timestamp": str(timestamp),
                   "webhook-signature": sign(self.key, message_id, timestamp, body),
                   "user-agent": "bentosvd-webhooks"}
        parts = urlsplit(url)
        target = url
        if scheme == "http":  # connect to the address just checked, not a fresh lookup
            host = f"[{address}]" if ":" in address else address
            target = parts._replace(netloc=f"{host}:{port}").geturl()
            headers["host"] = parts.netloc.rsplit("@", 1)[-1]
        try:
            async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False,
                                         trust_env=False) as client:
                response = await client.post(target, content=body, headers=headers)
        except httpx.HTTPError as e:
            return f"{type(e).__name__}: {e}"
        if 200 <= response.status_code < 300:
            return None
        if 300 <= response.status_code < 400:
            return f"answered {response.status_code} (redirects are not followed)"
        return f"answered {response.status_code}"

    async def close(self, grace: float = 5.0) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace)
