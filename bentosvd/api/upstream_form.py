"""The upstream BentoSVD sample's form, taken as ours: `image` for the file, and
`decode_chunk_size` and `seed` as form fields of their own, as its README sends them:

    curl -X POST http://localhost:3000/generate -H 'Content-Type: multipart/form-data' \\
      -F 'image=@assets/sample.png;type=image/png' -F 'decode_chunk_size=2' -F 'seed=null'

`RequestGuard` calls `translate` on a form that uses any of these names: the body is
rewritten as this service's own form (`img` and `params`), so everything after the guard,
BentoML included, sees one form only. A name given both ways (`img` and `image`,
`decode_chunk_size` and `params.decoding_t`, `seed` and `params.seed`) is a 400 naming both.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from bentosvd.errors import InvalidParams, InvalidRequest

FILE_ALIASES = {"image": "img"}
# upstream form field -> the params field it sets
PARAM_FIELDS = {"decode_chunk_size": "decoding_t", "seed": "seed"}
UPSTREAM_NAMES = (*FILE_ALIASES, *PARAM_FIELDS)
MAX_FIELD_BYTES = 64  # a number or null


@dataclass
class Part:
    name: str
    filename: bytes | None
    content_type: bytes | None
    data: bytearray


def uses_upstream_names(parts: list[tuple[str, bool]]) -> bool:
    return any(name in UPSTREAM_NAMES for name, _ in parts)


def translate(body: bytes, boundary: bytes, charset: str) -> tuple[bytes, bytes]:
    """The same request as this service's own form: (body, its boundary)."""
    parts = _read(body, boundary, charset)
    names = [p.name for p in parts]
    for alias, ours in FILE_ALIASES.items():
        if alias in names and ours in names:
            raise InvalidRequest(
                f"the image was sent twice, as {ours!r} and as {alias!r} (the upstream "
                "sample's name); send it once", field=ours, fix=f"send only -F '{ours}=@…'")
    params: dict = {}
    given = next((p for p in parts if p.name == "params"), None)
    if given is not None:
        try:
            params = json.loads(bytes(given.data).decode("utf-8") or "{}")
        except (UnicodeDecodeError, ValueError):
            params = None  # left as sent: the params check names the problem
    out: list[Part] = []
    for part in parts:
        if part.name in FILE_ALIASES:
            out.append(Part(FILE_ALIASES[part.name], part.filename, part.content_type, part.data))
        elif part.name in PARAM_FIELDS:
            target = PARAM_FIELDS[part.name]
            if not isinstance(params, dict):
                continue
            if target in params:
                raise InvalidRequest(
                    f"{target} was sent twice, as the form field {part.name!r} and as "
                    f"params.{target}; send it once", field=part.name,
                    fix=f"leave out -F '{part.name}=…' or params.{target}")
            params[target] = _value(part)
        elif part.name != "params":
            out.append(part)
    if isinstance(params, dict):
        data = bytearray(json.dumps(params).encode())
    else:
        data = given.data
    out.append(Part("params", None, None, data))
    return _write(out)


def _value(part: Part):
    if part.filename is not None or len(part.data) > MAX_FIELD_BYTES:
        raise InvalidParams(f"the form field {part.name!r} takes a number or null",
                            field=part.name, fix=f"send -F '{part.name}=2'")
    text = bytes(part.data).decode("latin-1").strip()
    if text in ("", "null", "None"):
        return None
    try:
        return int(text)
    except ValueError:
        raise InvalidParams(f"the form field {part.name!r} is not an integer or null: {text!r}",
                            field=part.name, fix=f"send -F '{part.name}=2'") from None


def _read(body: bytes, boundary: bytes, charset: str) -> list[Part]:
    parts: list[Part] = []
    header = {"name": bytearray(), "value": bytearray()}
    headers: dict[bytes, bytes] = {}

    def header_end():
        headers[bytes(header["name"]).lower()] = bytes(header["value"])
        header["name"].clear()
        header["value"].clear()

    def headers_finished():
        _, options = parse_options_header(headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"")
        try:
            name = name.decode(charset)
        except UnicodeDecodeError:
            name = name.decode("latin-1")
        parts.append(Part(name, options.get(b"filename"), headers.get(b"content-type"),
                          bytearray()))
        headers.clear()

    callbacks = {
        "on_header_field": lambda d, s, e: header["name"].extend(d[s:e]),
        "on_header_value": lambda d, s, e: header["value"].extend(d[s:e]),
        "on_header_end": header_end,
        "on_headers_finished": headers_finished,
        "on_part_data": lambda d, s, e: parts[-1].data.extend(d[s:e]),
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except FormParserError as e:  # already parsed once by the guard: not expected here
        raise InvalidRequest(f"malformed multipart/form-data body: {e}") from None
    return parts


def _quote(value: bytes) -> bytes:
    return value.replace(b"\\", b"\\\\").replace(b'"', b'\\"')


def _write(parts: list[Part]) -> tuple[bytes, bytes]:
    boundary = f"bentosvd-{uuid.uuid4().hex}".encode()
    out = bytearray()
    for part in parts:
        out += b"--" + boundary + b"\r\n"
        out += b'Content-Disposition: form-data; name="' + _quote(part.name.encode()) + b'"'
        if part.filename is not None:
            out += b'; filename="' + _quote(part.filename) + b'"'
        out += b"\r\n"
        if part.content_type:
            out += b"Content-Type: " + part.content_type + b"\r\n"
        out += b"\r\n" + part.data + b"\r\n"
    out += b"--" + boundary + b"--\r\n"
    return bytes(out), boundary
