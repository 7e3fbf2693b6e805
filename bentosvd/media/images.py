"""Decoding an uploaded image and sizing it for the model."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from bentosvd.errors import (
    InvalidImage,
    PayloadTooLarge,
    RequestError,
    UnsupportedMediaType,
)

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})
"""Pillow format names we accept. Everything else (GIF, BMP, TIFF, ICO, PSD, ...) is refused
with 415: those are rarely photos, and each extra decoder is more attack surface for
untrusted uploads. Multi-picture JPEGs from cameras (Pillow's "MPO") count as JPEG."""

_FIX = "Upload a PNG, JPEG or WebP image."
_SMALLER = "Upload an image with fewer pixels."
_SIZINGS = ("crop", "pad", "fit", "native")
NATIVE_MULTIPLE = 64  # sides the upstream sample rounds the image down to
_WHITE = (255, 255, 255, 255)


def target_size(width: int, height: int, landscape: tuple[int, int]) -> tuple[int, int]:
    """Model input (width, height): `landscape` e.g. (1024, 576) for images wider than tall
    or square, swapped (576, 1024) for portrait (height > width)."""
    lw, lh = landscape
    return (lh, lw) if height > width else (lw, lh)


def native_size(width: int, height: int, budget: int) -> tuple[int, int]:
    """The upstream sample's size: the image's own, scaled down (aspect kept) to at most
    `budget` pixels, each side rounded down to a multiple of 64 (at least 64)."""
    scale = min(1.0, (budget / (width * height)) ** 0.5)
    return tuple(max(NATIVE_MULTIPLE, int(side * scale) // NATIVE_MULTIPLE * NATIVE_MULTIPLE)
                 for side in (width, height))


def decode_upload(
    source: str | os.PathLike | bytes,
    landscape: tuple[int, int],
    *,
    sizing: str = "crop",
    orientation: str = "auto",
    max_pixels: int = 50_000_000,
    max_aspect: float = 10.0,
    min_side: int = 16,
) -> np.ndarray:
    """Open an uploaded image, return an (H, W, 3) uint8 RGB array at the model's size.

    `source` is a file path or the file's bytes. The size is `target_size(w, h, landscape)`
    after EXIF orientation, or `landscape` / its swap when `orientation` forces one; `sizing` says how to get there: "crop" scales to cover it and
    cuts the centre out, "pad" scales to fit inside it on black bars, "fit" stretches, "native" keeps the
    image's own size (`native_size`: the upstream sample's), ignoring `orientation`.
    Transparent pixels are shown over white; animated PNG/WebP give their first frame.

    Raises InvalidImage (400) for empty, corrupt or truncated files, a side under `min_side`
    or long/short side over `max_aspect`; UnsupportedMediaType (415) for a format outside
    ALLOWED_FORMATS; PayloadTooLarge (413) for more than `max_pixels` pixels; ValueError
    for an unknown `sizing` (a bug in the caller, not the request).
    """
    if sizing not in _SIZINGS:
        raise ValueError(f"sizing must be one of {_SIZINGS}, got {sizing!r}")
    if isinstance(source, (bytes, bytearray, memoryview)):
        empty, fp = len(source) == 0, io.BytesIO(source)
    else:
        empty, fp = os.path.getsize(source) == 0, source
    if empty:
        raise InvalidImage("The uploaded image is empty (0 bytes).", field="img", fix=_FIX)

    try:
        with Image.open(fp) as im:
            _check_header(im, max_pixels, max_aspect, min_side)
            if getattr(im, "is_animated", False):
                im.seek(0)  # the first frame stands for the whole animation
            im.load()  # decode everything now so truncated files fail here, not later
            rgb = to_rgb(ImageOps.exif_transpose(im))
    except (RequestError, MemoryError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own global limit, a backstop for when `max_pixels` is set above it.
        raise PayloadTooLarge(f"Too many pixels: {e}", field="img", fix=_SMALLER) from e
    except UnidentifiedImageError as e:
        raise InvalidImage("The upload is not an image we can read.", field="img", fix=_FIX) from e
    except Exception as e:  # any decoder failure on untrusted bytes is a bad file
        raise InvalidImage(f"The image is corrupt or truncated: {e}", field="img", fix=_FIX) from e

    size = target_size(*rgb.size, landscape)
    if orientation != "auto":
        size = landscape if orientation == "landscape" else landscape[::-1]
    if sizing == "native":  # the image's own size and orientation, within the model's pixels
        rgb = ImageOps.fit(rgb, native_size(*rgb.size, landscape[0] * landscape[1]),
                           Image.Resampling.LANCZOS)
    elif sizing == "crop":
        rgb = ImageOps.fit(rgb, size, Image.Resampling.LANCZOS)
    elif sizing == "pad":
        rgb = ImageOps.pad(rgb, size, Image.Resampling.LANCZOS, color=(0, 0, 0))
    else:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def _check_header(im: Image.Image, max_pixels: int, max_aspect: float, min_side: int) -> None:
    """Refuse by format and size, known from the header alone, before any pixel is decoded.

    Checking here instead of setting Image.MAX_IMAGE_PIXELS keeps the limit per call:
    that setting is process-wide and other threads may be decoding at the same time.
    """
    fmt = "JPEG" if im.format == "MPO" else im.format
    if fmt not in ALLOWED_FORMATS:
        raise UnsupportedMediaType(
            f"Image format {im.format} is not supported; use {', '.join(sorted(ALLOWED_FORMATS))}.",
            field="img",
            fix=_FIX,
        )
    w, h = im.size
    if w * h > max_pixels:
        raise PayloadTooLarge(
            f"The image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}.",
            field="img",
            fix=_SMALLER,
        )
    if min(w, h) < min_side:
        raise InvalidImage(
            f"The image is {w}x{h}; each side must be at least {min_side} pixels.",
            field="img",
            fix=f"Upload an image at least {min_side}x{min_side}.",
        )
    aspect = max(w, h) / min(w, h)
    if aspect > max_aspect:
        raise InvalidImage(
            f"The image is {w}x{h}, aspect ratio {aspect:.1f}; the limit is {max_aspect:g}.",
            field="img",
            fix=f"Crop the image so its long side is at most {max_aspect:g} times its short side.",
        )


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit "RGB"; transparency is flattened onto white.

    16-bit greyscale ("I;16*", and "I", which is how Pillow has loaded 16-bit PNGs) is scaled
    so 65535 → 255; Pillow's own convert would clip everything above 255 to white. "F" is
    taken on Pillow's 0-255 scale. 16-bit RGB(A) PNGs already arrive as 8-bit RGB(A).
    """
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im)
        if im.mode == "F":
            grey = np.clip(np.rint(a), 0, 255)
        else:
            grey = (np.clip(a, 0, 65535).astype(np.uint32) * 255 + 32767) // 65535
        out = Image.fromarray(grey.astype(np.uint8), "L")
        key = im.info.get("transparency")  # PNG tRNS: one exact grey value is transparent
        if isinstance(key, int):
            out.putalpha(Image.fromarray(np.where(a == key, 0, 255).astype(np.uint8), "L"))
        im = out
    if im.mode == "La":  # premultiplied; Pillow converts it only to LA
        im = im.convert("LA")
    if im.has_transparency_data:
        flat = Image.alpha_composite(Image.new("RGBA", im.size, _WHITE), im.convert("RGBA"))
        return flat.convert("RGB")
    return im.convert("RGB")
