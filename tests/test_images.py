"""bentosvd.media.images: real images made with Pillow, decoded for real."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from bentosvd.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType
from bentosvd.media.images import ALLOWED_FORMATS, decode_upload, native_size, target_size, to_rgb

SMALL = (64, 48)  # a landscape model size that keeps the tests fast
RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png(width: int, height: int, depth: int, colour_type: int, raw: bytes) -> bytes:
    """A PNG written by hand, for what Pillow will not write (16-bit RGB, lying headers)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def png16_rgb(rgb: np.ndarray) -> bytes:
    h, w, _ = rgb.shape
    return png(w, h, 16, 2, b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb))


def bands(size: tuple[int, int], colours) -> Image.Image:
    """Vertical bands of equal width, left to right."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    for i, c in enumerate(colours):
        a[:, i * w // len(colours) : (i + 1) * w // len(colours)] = c
    return Image.fromarray(a)


def palette(transparent: bool) -> Image.Image:
    im = Image.new("P", (40, 30), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    if transparent:
        im.info["transparency"] = 1
    return im


def mean_colour(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, 3).mean(axis=0)


# --- target_size -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (1920, 1080, (1024, 576)),
        (1080, 1920, (576, 1024)),
        (500, 500, (1024, 576)),  # square counts as landscape
        (501, 500, (1024, 576)),
        (500, 501, (576, 1024)),
    ],
)
def test_target_size(width, height, expected):
    assert target_size(width, height, (1024, 576)) == expected


# --- colour modes ----------------------------------------------------------------------------

# (upload bytes, expected colour of every pixel, tolerance)
MODE_CASES = {
    "RGB png": (lambda: encode(Image.new("RGB", (40, 30), (200, 30, 40)), "PNG"), (200, 30, 40), 0),
    "RGB jpeg": (lambda: encode(Image.new("RGB", (40, 30), (200, 30, 40)), "JPEG", quality=95), (200, 30, 40), 4),
    "RGB webp": (lambda: encode(Image.new("RGB", (40, 30), (200, 30, 40)), "WEBP", lossless=True), (200, 30, 40), 0),
    "RGBA clear over white": (lambda: encode(Image.new("RGBA", (40, 30), (10, 20, 30, 0)), "PNG"), WHITE, 0),
    "RGBA half black": (lambda: encode(Image.new("RGBA", (40, 30), (0, 0, 0, 128)), "PNG"), (127, 127, 127), 1),
    "RGBA webp clear": (lambda: encode(Image.new("RGBA", (40, 30), (0, 0, 0, 0)), "WEBP", lossless=True), WHITE, 0),
    "LA clear": (lambda: encode(Image.new("LA", (40, 30), (0, 0)), "PNG"), WHITE, 0),
    "P": (lambda: encode(palette(transparent=False), "PNG"), (10, 200, 30), 0),
    "P transparent": (lambda: encode(palette(transparent=True), "PNG"), WHITE, 0),
    "L": (lambda: encode(Image.new("L", (40, 30), 77), "PNG"), (77, 77, 77), 0),
    "1": (lambda: encode(Image.new("1", (40, 30), 1), "PNG"), WHITE, 0),
    "CMYK jpeg": (lambda: encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95), RED, 4),
    "I;16 png max": (lambda: encode(Image.new("I;16", (40, 30), 65535), "PNG"), WHITE, 0),
    "I;16 png mid": (lambda: encode(Image.new("I;16", (40, 30), 32896), "PNG"), (128, 128, 128), 0),
    "RGB 16-bit png": (
        lambda: png16_rgb(np.full((30, 40, 3), (65535, 32896, 2570), np.uint16)),
        (255, 128, 10),
        0,
    ),
}


@pytest.mark.parametrize(("make", "colour", "tol"), MODE_CASES.values(), ids=MODE_CASES.keys())
def test_modes_decode_to_rgb(make, colour, tol):
    out = decode_upload(make(), SMALL)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - colour).max() <= tol


# Modes no allowed file format produces, but to_rgb still handles.
TO_RGB_CASES = {
    "PA clear": (Image.new("PA", (4, 4), (0, 0)), WHITE),
    "La clear": (Image.new("La", (4, 4), (0, 0)), WHITE),
    "RGBa clear": (Image.new("RGBa", (4, 4), (0, 0, 0, 0)), WHITE),
    "I 16-bit range": (Image.new("I", (4, 4), 65535), WHITE),
    "I;16B mid": (Image.new("I;16B", (4, 4), 32896), (128, 128, 128)),
    "F": (Image.new("F", (4, 4), 99.6), (100, 100, 100)),
    "YCbCr": (Image.new("RGB", (4, 4), (200, 30, 40)).convert("YCbCr"), (200, 30, 40)),
}


@pytest.mark.parametrize(("im", "colour"), TO_RGB_CASES.values(), ids=TO_RGB_CASES.keys())
def test_to_rgb(im, colour):
    out = to_rgb(im)
    assert out.mode == "RGB"
    assert np.abs(np.asarray(out).astype(int) - colour).max() <= 2  # YCbCr round trip is lossy


def test_16bit_grey_gradient_scales_not_clips():
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    data = encode(Image.fromarray(np.tile(ramp, (32, 1))), "PNG")
    out = decode_upload(data, (256, 32), sizing="fit")[0, :, 0]  # same size: no resampling
    assert out[0] == 0 and out[-1] == 255
    assert np.all(np.diff(out.astype(int)) >= 0)
    assert np.abs(out - ramp / 257).max() <= 0.5


def test_16bit_grey_transparency_key_goes_white():
    im = Image.fromarray(np.array([[0, 1000]] * 20, np.uint16).repeat(20, axis=1))
    data = encode(im, "PNG", transparency=0)
    out = decode_upload(data, (40, 20), sizing="fit")
    assert (out[:, :20] == 255).all()  # grey 0 was transparent
    assert (out[:, 20:] == 4).all()  # 1000 / 257 rounds to 4


# --- orientation, animation, formats ------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "red_corner"),
    [(1, "top-left"), (3, "bottom-right"), (6, "top-right"), (8, "bottom-left")],
)
def test_exif_orientation(orientation, red_corner):
    a = np.zeros((48, 64, 3), np.uint8)
    a[...] = BLUE
    a[:24, :32] = RED  # red top-left quadrant as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(a), "JPEG", quality=95, exif=exif.tobytes())

    out = decode_upload(data, SMALL, sizing="fit")
    h, w = out.shape[:2]
    assert (h, w) == ((64, 48) if orientation in (6, 8) else (48, 64))  # rotated → portrait
    quads = {
        "top-left": out[: h // 2, : w // 2],
        "top-right": out[: h // 2, w // 2 :],
        "bottom-left": out[h // 2 :, : w // 2],
        "bottom-right": out[h // 2 :, w // 2 :],
    }
    for name, q in quads.items():
        expected = RED if name == red_corner else BLUE
        assert np.abs(mean_colour(q) - expected).max() < 20, name


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
def test_animated_uses_first_frame(fmt):
    frames = [Image.new("RGB", (40, 30), c) for c in (RED, GREEN, BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, lossless=True)
    assert getattr(Image.open(io.BytesIO(data)), "is_animated", False)
    assert np.abs(decode_upload(data, SMALL).astype(int) - RED).max() <= 2


def test_mpo_counts_as_jpeg():
    frames = [Image.new("RGB", (40, 30), c) for c in (RED, BLUE)]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:], quality=95)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert np.abs(mean_colour(decode_upload(data, SMALL)) - RED).max() < 4


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "ICO", "PPM"])
def test_other_formats_are_refused_with_415(fmt):
    data = encode(Image.new("RGB", (40, 30), RED), fmt)
    with pytest.raises(UnsupportedMediaType) as err:
        decode_upload(data, SMALL)
    assert err.value.status_code == 415 and err.value.field == "img"
    assert fmt in err.value.message and all(f in err.value.message for f in ALLOWED_FORMATS)


# --- bad uploads ------------------------------------------------------------------------------


def noisy_png() -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")


def noisy_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")


BAD_UPLOADS = {
    "empty": lambda: b"",
    "random bytes": lambda: np.random.default_rng(1).bytes(4096),
    "text": lambda: b"hello, this is not an image",
    "png header only": lambda: noisy_png()[:40],
    "truncated png": lambda: noisy_png()[: len(noisy_png()) // 2],
    "truncated jpeg": lambda: noisy_jpeg()[: len(noisy_jpeg()) // 2],
    "corrupt png data": lambda: noisy_png()[:100] + b"\0" * 2000 + noisy_png()[2100:],
}


@pytest.mark.parametrize("make", BAD_UPLOADS.values(), ids=BAD_UPLOADS.keys())
def test_bad_uploads_are_invalid_images(make):
    with pytest.raises(InvalidImage) as err:
        decode_upload(make(), SMALL)
    assert err.value.status_code == 400 and err.value.field == "img"
    assert "PNG" in err.value.fix and "JPEG" in err.value.fix and "WebP" in err.value.fix


def test_empty_file_path(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(InvalidImage, match="empty"):
        decode_upload(path, SMALL)


BOMBS = {
    # Header claims 40000x40000 (1.6 Gpx) over a few bytes of data: refused from the header
    # (Pillow's own bomb check fires inside Image.open), so nothing is ever decoded.
    "1.6 Gpx header": (lambda: png(40000, 40000, 1, 0, b"\0" * 100), {}),
    "1.6 Gpx header, our limit higher": (lambda: png(40000, 40000, 1, 0, b""), {"max_pixels": 10**10}),
    "56 Mpx real PNG": (lambda: encode(Image.new("1", (8000, 7000)), "PNG"), {}),  # under Pillow's limit
    "max_pixels": (lambda: encode(Image.new("L", (100, 100)), "PNG"), {"max_pixels": 9_999}),
}


@pytest.mark.parametrize(("make", "kwargs"), BOMBS.values(), ids=BOMBS.keys())
def test_too_many_pixels_is_413(make, kwargs):
    data = make()
    assert len(data) < 50_000  # a small file that claims many pixels
    with pytest.raises(PayloadTooLarge) as err:
        decode_upload(data, SMALL, **kwargs)
    assert err.value.status_code == 413 and err.value.field == "img" and "pixels" in err.value.message


@pytest.mark.parametrize(
    ("size", "kwargs", "words"),
    [
        ((1, 1), {}, ["1x1", "16"]),
        ((15, 100), {}, ["15x100", "16"]),
        ((10000, 10), {}, ["10000x10"]),
        ((1100, 100), {}, ["1100x100", "11.0", "10"]),
        ((300, 100), {"max_aspect": 2.5}, ["300x100", "2.5"]),
        ((40, 30), {"min_side": 32}, ["40x30", "32"]),
    ],
)
def test_bad_sizes_are_400(size, kwargs, words):
    with pytest.raises(InvalidImage) as err:
        decode_upload(encode(Image.new("L", size), "PNG"), SMALL, **kwargs)
    assert err.value.status_code == 400
    assert all(w in err.value.message for w in words), err.value.message


def test_limits_are_inclusive():
    out = decode_upload(encode(Image.new("L", (160, 16)), "PNG"), SMALL)  # side 16, aspect 10
    assert out.shape == (48, 64, 3)


# --- sizing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "shape"),
    [((1920, 1080), (576, 1024, 3)), ((1080, 1920), (1024, 576, 3)), ((700, 700), (576, 1024, 3))],
)
@pytest.mark.parametrize("sizing", ["crop", "pad", "fit"])
def test_output_shape_follows_orientation(size, shape, sizing):
    out = decode_upload(encode(Image.new("RGB", size, RED), "JPEG"), (1024, 576), sizing=sizing)
    assert out.shape == shape and out.dtype == np.uint8 and out.flags.c_contiguous


@pytest.mark.parametrize("size", [(999, 1000), (1000, 999), (333, 777), (641, 479), (17, 16)])
@pytest.mark.parametrize("sizing", ["crop", "pad", "fit"])
def test_output_size_is_exact(size, sizing):
    out = decode_upload(encode(Image.new("RGB", size, RED), "PNG"), SMALL, sizing=sizing)
    w, h = target_size(*size, SMALL)
    assert out.shape == (h, w, 3)


@pytest.mark.parametrize(("size", "budget", "expected"), [
    ((1000, 700), (256, 144), (192, 128)),  # scaled to 229x160, rounded down
    ((1024, 576), (1024, 576), (1024, 576)),  # the model's own: unchanged
    ((1280, 720), (1024, 576), (1024, 576)),  # more pixels than the model's: scaled
    ((600, 900), (1024, 576), (576, 896)),  # portrait stays portrait, within the budget
    ((100, 70), (1024, 576), (64, 64)),  # small: at least 64 a side
])
def test_native_sizing_keeps_the_images_own_size_in_multiples_of_64(size, budget, expected):
    assert native_size(*size, budget[0] * budget[1]) == expected
    out = decode_upload(encode(Image.new("RGB", size, RED), "PNG"), budget, sizing="native")
    assert out.shape == (expected[1], expected[0], 3)


# A 300x50 image of green | red | blue bands, sized to 64x48; colours sampled at columns
# 4, 32 and 59 on the top row and the middle row.
@pytest.mark.parametrize(
    ("sizing", "top", "middle"),
    [
        ("crop", [RED] * 3, [RED] * 3),  # cover then centre crop keeps only the middle band
        ("pad", [BLACK] * 3, [GREEN, RED, BLUE]),  # contain: a strip on black bars
        ("fit", [GREEN, RED, BLUE], [GREEN, RED, BLUE]),  # stretched: every band, full height
    ],
)
def test_sizing_geometry(sizing, top, middle):
    data = encode(bands((300, 50), [GREEN, RED, BLUE]), "PNG")
    out = decode_upload(data, SMALL, sizing=sizing).astype(int)
    for row, expected in ((0, top), (24, middle)):
        got = out[row, [4, 32, 59]]
        assert np.abs(got - expected).max() <= 8, (row, got.tolist())


def test_crop_takes_the_centre():
    data = encode(bands((200, 50), [RED, BLUE]), "PNG")  # cover → 192x48, keep columns 64..128
    out = decode_upload(data, SMALL, sizing="crop").astype(int)
    assert np.abs(out[:, :28] - RED).max() <= 8
    assert np.abs(out[:, 36:] - BLUE).max() <= 8


def test_pad_portrait_gets_side_bars():
    out = decode_upload(encode(Image.new("RGB", (30, 90), RED), "PNG"), SMALL, sizing="pad")
    assert out.shape == (64, 48, 3)  # portrait target; image scaled to 21x64 in the middle
    assert (out[:, :10] == 0).all() and (out[:, -10:] == 0).all()
    assert np.abs(out[:, 20:28].astype(int) - RED).max() <= 2


@pytest.mark.parametrize("kind", ["bytes", "str path", "Path"])
def test_sources(tmp_path, kind):
    data = encode(Image.new("RGB", (40, 30), GREEN), "PNG")
    path = tmp_path / "in.png"
    path.write_bytes(data)
    source = {"bytes": data, "str path": str(path), "Path": path}[kind]
    assert (decode_upload(source, SMALL) == GREEN).all()


def test_unknown_sizing_is_value_error():
    with pytest.raises(ValueError, match="sizing"):
        decode_upload(encode(Image.new("RGB", (40, 30)), "PNG"), SMALL, sizing="stretch")
