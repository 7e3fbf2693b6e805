"""Errors with their HTTP status, and the one JSON shape every error answer takes.

Raised where the problem is found and turned into an HTTP answer once, by `error_response`:
`{"error": <name>, "message": <what happened>, "field"?: <what to fix>, "fix"?: <how>,
"request_id"?: <for the log>}`, with `Retry-After` when trying again later may work.
"""

from __future__ import annotations

from http import HTTPStatus

from starlette.responses import JSONResponse


def phrase(status: int) -> str:
    """The status's reason phrase (499 has none in the RFCs)."""
    return HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Client Closed Request"


class ServiceError(Exception):
    """An error answer: `status_code`, and the body's fields. `error` defaults to the
    class's name for the typed errors below and to the status's phrase otherwise."""

    status_code = 500

    def __init__(self, message: str, *, field: str | None = None, fix: str | None = None,
                 status: int | None = None, retry_after: int | None = None,
                 request_id: str | None = None, error: str | None = None):
        super().__init__(message)
        self.message, self.field, self.fix = message, field, fix
        if status is not None:
            self.status_code = status
        self.retry_after, self.request_id = retry_after, request_id
        self.error = error or (type(self).__name__ if type(self) is not ServiceError
                               else phrase(self.status_code))

    def to_json(self) -> dict:
        body = {"error": self.error, "message": self.message}
        for key in ("field", "fix", "request_id"):
            if getattr(self, key) is not None:
                body[key] = getattr(self, key)
        return body


def error_response(error: ServiceError | int, message: str | None = None, *,
                   retry_after: int | None = None) -> JSONResponse:
    """The JSON answer for `error`, or for a status and message."""
    if not isinstance(error, ServiceError):
        error = ServiceError(message, status=error, retry_after=retry_after)
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return JSONResponse(error.to_json(), status_code=error.status_code, headers=headers)


class RequestError(ServiceError):
    """A problem with the request: the client can fix it and try again."""

    status_code = 400


class InvalidImage(RequestError):
    """The upload is not an image we can read (corrupt, truncated, empty)."""

    status_code = 400


class UnsupportedMediaType(RequestError):
    """The upload is an image format or content type outside the allowlist."""

    status_code = 415


class InvalidParams(RequestError):
    """`params` is not valid for this model (e.g. decoding_t above its frame count)."""

    status_code = 400


class PayloadTooLarge(RequestError):
    """The upload is larger than the configured byte or pixel limit."""

    status_code = 413


class InvalidRequest(RequestError):
    """The request's form is wrong: a field missing, repeated or unknown, or bad multipart."""

    status_code = 400


class RequestTimeout(RequestError):
    """The request's body did not arrive within the upload deadline (a slow or stuck client)."""

    status_code = 408
