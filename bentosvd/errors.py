"""Errors a caller can fix, each with its HTTP status.

Raised where the problem is found and turned into an HTTP answer once, in `service.py`;
`error_response` is the JSON answer every error of the service's own takes.
"""

from __future__ import annotations

from http import HTTPStatus

from starlette.responses import JSONResponse


def phrase(status: int) -> str:
    """The `error` of a JSON error: the status's reason phrase (499 has none in the RFCs)."""
    return HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Client Closed Request"


def error_response(status: int, body: dict | str, *, retry_after: int | None = None) -> JSONResponse:
    """A JSON error answer: `body`, or {"error": phrase, "message": body} for a string."""
    if isinstance(body, str):
        body = {"error": phrase(status), "message": body}
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(body, status_code=status, headers=headers)


class RequestError(Exception):
    """A problem with the request: the client can fix it and try again."""

    status_code = 400

    def __init__(self, message: str, *, field: str | None = None, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.fix = fix

    def to_json(self) -> dict:
        body = {"error": type(self).__name__, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        if self.fix is not None:
            body["fix"] = self.fix
        return body


class InvalidImage(RequestError):
    """The upload is not an image we can read (corrupt, truncated, empty)."""

    status_code = 400


class UnsupportedMediaType(RequestError):
    """The upload is an image format or content type outside the allowlist."""

    status_code = 415


class InvalidParams(RequestError):
    """`params` is not valid for this model (e.g. decoding_t above its frame count).

    400, like BentoML's own answer to a `params` that fails the schema."""

    status_code = 400


class PayloadTooLarge(RequestError):
    """The upload is larger than the configured byte or pixel limit."""

    status_code = 413
