"""Keys at the door: with API_KEYS or API_KEYS_FILE set, every route but the probes (and
the web page's static files, which hold no data) needs `Authorization: Bearer <key>`.

A missing or wrong key gets 401 with `WWW-Authenticate`, in the service's one error shape.
Keys are compared in constant time and never logged. The keys file (one key a line, `#`
comments) is read again when it changes, so a key is rotated without a restart: add the
new key, move the clients over, remove the old one.
"""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

from bentosvd.errors import ServiceError, error_response

logger = logging.getLogger("bentoml.svd")

# Open whatever the keys: the probes a load balancer or Kubernetes calls without a key,
# and the web page's files (the page itself asks for the key and sends it on each call).
OPEN_PATHS = ("/livez", "/readyz", "/healthz")
OPEN_PREFIXES = ("/ui",)


class ApiKeys:
    """The accepted keys: `keys`, plus those in `keys_file` as it reads now."""

    def __init__(self, keys: list[str], keys_file: str | None = None):
        self._keys = [k.encode() for k in keys if k]
        self._file = Path(keys_file).expanduser() if keys_file else None
        self._file_keys: list[bytes] = []
        self._file_stamp: tuple | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._keys or self._file)

    def _from_file(self) -> list[bytes]:
        try:
            stat = os.stat(self._file)
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if stamp != self._file_stamp:
                lines = self._file.read_text().splitlines()
                self._file_keys = [line.strip().encode() for line in lines
                                   if line.strip() and not line.strip().startswith("#")]
                self._file_stamp = stamp
        except OSError as e:
            # Keep the keys last read: a file being replaced must not open the door.
            logger.warning("could not read API_KEYS_FILE %s: %s", self._file, e)
        return self._file_keys

    def accepts(self, authorization: str | None) -> bool:
        """Whether an Authorization header carries one of the keys."""
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return False
        given_bytes = given.strip().encode()
        keys = self._keys + (self._from_file() if self._file else [])
        # Every key compared, each in constant time: the answer's timing says nothing.
        matched = False
        for key in keys:
            matched |= hmac.compare_digest(given_bytes, key)
        return matched


class RequireApiKey:
    """ASGI middleware: 401 for a request without an accepted key, unless its path is open
    (`/metrics` too when `metrics_open`)."""

    def __init__(self, app, keys: ApiKeys, metrics_open: bool = True):
        self.app, self.keys, self.metrics_open = app, keys, metrics_open

    def _open(self, path: str) -> bool:
        if path in OPEN_PATHS or (self.metrics_open and path == "/metrics"):
            return True
        return any(path == p or path.startswith(p + "/") for p in OPEN_PREFIXES)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys.enabled or self._open(scope["path"]):
            return await self.app(scope, receive, send)
        headers = dict((k.lower(), v) for k, v in scope["headers"])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        if self.keys.accepts(authorization):
            return await self.app(scope, receive, send)
        problem = "a wrong API key" if authorization else "no API key"
        response = error_response(ServiceError(
            f"this server needs an API key; the request had {problem}", status=401,
            field="Authorization", fix="send the header `Authorization: Bearer <key>` with a "
            "key the server's operator gave you"))
        response.headers["WWW-Authenticate"] = 'Bearer realm="bentosvd"'
        await response(scope, receive, send)
