"""Errors a caller can fix, each with its HTTP status.

Raised where the problem is found and turned into an HTTP answer once, in `service.py`.
"""

from __future__ import annotations


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
