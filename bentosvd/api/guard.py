"""Checks `POST /generate` requests before BentoML parses them.

BentoML downloads a URL sent where a file is expected (a string in the `img` part, or a
JSON body `{"img": "http://..."}`), quietly keeps the first of two `img` parts, and reads a
body of any size. This ASGI middleware refuses those requests with the same JSON errors
as the service (`{"error", "message", "field", "fix"}`): it caps the body (413), accepts
only multipart/form-data (415), and lets a request through only with exactly one `img`
file part and at most one `params` part (400). The app then gets the original bytes.

`AnswerErrors` makes sure every request gets an answer at once, even when its handler
raises before answering (see there why BentoML alone does not).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import time
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from bentosvd.api.upstream_form import translate, uses_upstream_names
from bentosvd.errors import (
    InvalidParams,
    InvalidRequest,
    PayloadTooLarge,
    RequestError,
    RequestTimeout,
    UnsupportedMediaType,
    error_response,
)

logger = logging.getLogger("bentoml.svd")

EXAMPLE = "curl -F 'img=@image.png' -F 'params={\"seed\": 42}' http://HOST/generate"


class ClientGone(Exception):
    """The client disconnected before its answer was ready: nobody is left to answer."""


class AnswerErrors:
    """ASGI middleware, the outermost of ours: a request whose handling raises before it
    answers gets its answer at once.

    BentoML's TimeoutMiddleware, which runs outside every middleware a service adds, waits
    for the first byte of a response, not for the handler: after an exception it holds the
    request unanswered until the traffic timeout (TIMEOUT, 300 s), and a graceful shutdown
    waits for it. BentoML's own /readyz raises so when a worker's readiness probe goes
    unanswered for 5 s (a worker still importing torch or loading weights): that is a 503,
    not ready; anything else is a 500, logged with its traceback."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        answered = False

        async def watch(message):
            nonlocal answered
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as e:
            if answered:
                raise
            if scope["path"].rstrip("/") == "/readyz":
                # Every probe while a worker loads: not worth a line each at the default level.
                logger.debug("not ready: a GPU worker did not answer its readiness probe (%r)", e)
                response = error_response(
                    503, "a GPU worker did not answer its readiness probe in time; it is "
                    "probably still loading the model", retry_after=5)
            else:
                logger.exception("%s %s failed", scope["method"], scope["path"])
                response = error_response(
                    500, "the server failed on this request; its log has the details")
            await response(scope, receive, send)


class RequestGuard:
    """ASGI middleware: `SVD.add_asgi_middleware(RequestGuard, max_body_bytes=...)`.

    Only POSTs to `path` are checked; every other request passes through untouched.
    """

    def __init__(self, app, *, path: str = "/generate", max_body_bytes: int, body_timeout: float,
                 file_fields=("img",), json_fields: dict[str, JsonField] | None = None) -> None:
        self.app = app
        self.path = path.rstrip("/")
        self.max_body_bytes, self.body_timeout = max_body_bytes, body_timeout
        self.file_fields = tuple(file_fields)
        self.json_fields = dict(json_fields or {})
        self.text_fields = tuple(self.json_fields)

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] != "http" or scope["method"] != "POST"
                or scope["path"].rstrip("/") != self.path):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        try:
            boundary, charset = self._multipart_boundary(headers.get(b"content-type", b""))
            self._check_length(headers.get(b"content-length"))
            body = await self._read_body(receive)
            lister = list_parts(body, boundary, charset, collect=self.json_fields)
            if uses_upstream_names(lister.parts):  # the upstream sample's form
                body, boundary = translate(body, boundary, charset)
                scope = _with_form_headers(scope, boundary, len(body))
                lister = list_parts(body, boundary, "utf-8", collect=self.json_fields)
            self._check_parts(lister.parts)
            for name, data in lister.contents.items():
                self.json_fields[name].check(name, data)
        except ClientGone:
            return
        except RequestError as e:
            response = error_response(e)
            if isinstance(e, RequestTimeout):  # the rest of the body is not waited for
                response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    def _multipart_boundary(self, content_type: bytes) -> tuple[bytes, str]:
        media_type, options = parse_options_header(content_type)
        if media_type != b"multipart/form-data" or not options.get(b"boundary"):
            got = content_type.decode("latin-1") or "no Content-Type"
            raise UnsupportedMediaType(
                f"POST {self.path} takes multipart/form-data with the image as a file part "
                f"(got {got}); JSON and urlencoded bodies are refused, and URLs are not fetched",
                fix=f"upload the image file: {EXAMPLE}")
        # Names are decoded with the charset Starlette will use, so both see the same names.
        charset = options.get(b"charset", b"utf-8").decode("latin-1")
        try:
            charset = codecs.lookup(charset).name
        except LookupError:
            charset = "latin-1"
        return options[b"boundary"], charset

    def _too_large(self, size: str) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body is {size} bytes; the limit is {self.max_body_bytes}",
            field=self.file_fields[0],
            fix="send a smaller image (it is resized to the model's size anyway)")

    def _check_length(self, content_length: bytes | None) -> None:
        # Refuse before reading a byte; the server drops the unread body on its own.
        if content_length is not None and content_length.strip().isdigit():
            if int(content_length) > self.max_body_bytes:
                raise self._too_large(content_length.decode())

    async def _read_body(self, receive) -> bytes:
        # A chunked body has no length up front: stop as soon as it passes the cap. A body
        # trickled in (a slow or stuck client) must be whole by the deadline; until then it
        # holds only its own buffer, never a GPU or a place in the queue.
        body = bytearray()
        deadline = time.monotonic() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise RequestTimeout(
                    f"the request body did not arrive within {self.body_timeout:g} s "
                    f"({len(body)} bytes came)", fix="send the whole upload at once, or over "
                    "a faster connection") from None
            if message["type"] == "http.disconnect":
                raise ClientGone()
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                raise self._too_large(f"more than {self.max_body_bytes}")
            if not message.get("more_body", False):
                return bytes(body)

    def _check_parts(self, parts: list[tuple[str, bool]]) -> None:
        allowed = self.file_fields + self.text_fields
        for name, _ in parts:
            if name not in allowed:
                raise InvalidRequest(
                    f"unknown form field {name!r}; the fields are {', '.join(allowed)}",
                    field=name, fix=f"send only {', '.join(allowed)}: {EXAMPLE}")
        for field in allowed:
            if sum(name == field for name, _ in parts) > 1:
                raise InvalidRequest(f"form field {field!r} was sent more than once",
                                     field=field, fix=f"send {field!r} once")
        for field in self.file_fields:
            found = [is_file for name, is_file in parts if name == field]
            if not found:
                raise InvalidRequest(f"the form field {field!r} (the image file) is missing",
                                     field=field, fix=f"upload the image as a file: {EXAMPLE}")
            if not found[0]:
                # Without a filename Starlette hands BentoML a string, which it downloads.
                raise InvalidRequest(
                    f"{field!r} must be an uploaded file, not text; URLs and other strings "
                    "are not fetched",
                    field=field, fix=f"upload the file with -F '{field}=@file.png': {EXAMPLE}")


MAX_FILENAME_BYTES = 200


@dataclass(frozen=True)
class JsonField:
    """A form field holding JSON, checked before BentoML parses it: Python's json module
    raises RecursionError on deep nesting and ValueError on numbers of thousands of digits,
    and BentoML answers both with a 500. Within the limits, `schema` validates it, so its
    errors take the service's one error shape."""

    schema: type[BaseModel]
    max_bytes: int
    max_depth: int
    max_digits: int

    def check(self, name: str, data: bytes) -> None:
        fix = f"send a JSON object, e.g. {EXAMPLE}"
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidParams(f"{name} is not UTF-8 text (byte {e.start})", field=name,
                                fix=f"send JSON encoded as UTF-8: {fix}") from None
        depth = json_depth(text)
        if depth > self.max_depth:
            raise InvalidParams(f"{name} nests arrays or objects {depth} deep; the limit is "
                                f"{self.max_depth}", field=name, fix=fix)

        def number(kind):
            def parse(literal: str):
                digits = sum(c.isdigit() for c in literal)
                if digits > self.max_digits:
                    raise _TooManyDigits(f"{name} holds a number of {digits} digits; the "
                                         f"limit is {self.max_digits}")
                return kind(literal)
            return parse

        def constant(literal: str):
            raise _TooManyDigits(f"{name} holds {literal}, which is not a JSON number")

        try:
            value = json.loads(text, parse_int=number(int), parse_float=number(float),
                               parse_constant=constant)
        except _TooManyDigits as e:
            raise InvalidParams(str(e), field=name, fix=fix) from None
        except ValueError as e:
            raise InvalidParams(f"{name} is not valid JSON: {e}", field=name, fix=fix) from None
        try:
            self.schema.model_validate(value)
        except ValidationError as e:
            error = e.errors(include_url=False)[0]
            where = ".".join([name, *map(str, error["loc"])])
            raise InvalidParams(f"{where}: {error['msg']}", field=where,
                                fix="see GET /info for every param's type and bounds") from None


class _TooManyDigits(ValueError):
    pass


def json_depth(text: str) -> int:
    """How deep arrays and objects nest in `text` (JSON), found without parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


class _PartLister:
    """python-multipart callbacks that note each part's name and whether it is a file,
    decided exactly as Starlette decides it (a `filename` in its Content-Disposition).
    Part contents are skipped: they are checked by the service."""

    def __init__(self, charset: str, collect: dict[str, JsonField] | None = None) -> None:
        self.charset = charset
        self.parts: list[tuple[str, bool]] = []
        self.collect = collect or {}  # name -> its limits: these parts' contents are kept
        self.contents: dict[str, bytearray] = {}
        self.current: bytearray | None = None
        self.header_name = bytearray()
        self.header_value = bytearray()
        self.disposition = b""
        self.ended = False

    def callbacks(self) -> dict:
        return {
            "on_header_field": lambda data, start, end: self.header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self.header_value.extend(data[start:end]),
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_end": self.on_end,
        }

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.current is None:
            return
        self.current.extend(data[start:end])
        name = self.parts[-1][0]
        limit = self.collect[name].max_bytes
        if len(self.current) > limit:
            # Starlette refuses a text part over 1 MiB with an exception, which BentoML
            # answers 500; params never need more than a few hundred bytes.
            raise PayloadTooLarge(f"the form field {name!r} is over {limit} bytes",
                                  field=name, fix=f"send at most {limit} bytes of JSON in {name!r}")

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = bytes(self.header_value)
        self.header_name.clear()
        self.header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        self.disposition = b""
        if b"name" not in options:
            raise InvalidRequest("a multipart part has no name in its Content-Disposition",
                                 fix=f"send a well-formed multipart/form-data body: {EXAMPLE}")
        name = _decode(options[b"name"], self.charset)
        filename = options.get(b"filename", b"")
        if len(filename) > MAX_FILENAME_BYTES:
            # BentoML keeps the name in its temporary file's name: past the file system's
            # 255 bytes that is an OSError, a 500.
            raise InvalidRequest(
                f"the uploaded file's name is {len(filename)} bytes; the limit is "
                f"{MAX_FILENAME_BYTES}", field=name,
                fix=f"rename the file, or send -F '{name}=@file.png;filename=image.png'")
        self.parts.append((name, b"filename" in options))
        self.current = None
        if name in self.collect and name not in self.contents:
            self.current = self.contents[name] = bytearray()

    def on_end(self) -> None:
        self.ended = True


def list_parts(body: bytes, boundary: bytes, charset: str = "utf-8",
               collect: dict[str, JsonField] | None = None) -> _PartLister:
    """The parts of a multipart/form-data body: `.parts`, (name, is a file) of each, and
    `.contents`, the bytes of the first part of each name in `collect` (PayloadTooLarge
    past its limit); InvalidRequest if the body is not well-formed multipart (including one
    cut off before its last boundary)."""
    lister = _PartLister(charset, collect)
    try:
        parser = MultipartParser(boundary, lister.callbacks())
        parser.write(body)
        parser.finalize()
    except FormParserError as e:
        raise InvalidRequest(f"malformed multipart/form-data body: {e}",
                             fix=f"send a well-formed multipart/form-data body: {EXAMPLE}") from None
    if not lister.ended:
        raise InvalidRequest("malformed multipart/form-data body: it ends before its closing "
                             "boundary", fix=f"send a well-formed multipart/form-data body: {EXAMPLE}")
    return lister


def _decode(value: bytes, charset: str) -> str:
    # Starlette's rule for names: the request's charset, else latin-1.
    try:
        return value.decode(charset)
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _headers(scope) -> dict[bytes, bytes]:
    headers: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        headers.setdefault(name.lower(), value)  # the first one, as Starlette reads it
    return headers


def _with_form_headers(scope, boundary: bytes, length: int) -> dict:
    """`scope` for a rewritten multipart body: its boundary and length."""
    headers = [(k, v) for k, v in scope["headers"]
               if k.lower() not in (b"content-type", b"content-length")]
    headers += [(b"content-type", b"multipart/form-data; charset=utf-8; boundary=" + boundary),
                (b"content-length", str(length).encode())]
    return {**scope, "headers": headers}


def _replay(body: bytes, receive):
    """A `receive` that hands the app the buffered body, then the client's own messages
    (so the app still sees a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
