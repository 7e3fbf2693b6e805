"""bentosvd.video: real H.264 encodes with PyAV, read back and decoded."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from bentosvd.video import encode_mp4, probe_video


def clip(frames: int = 14, height: int = 48, width: int = 64) -> np.ndarray:
    """A gradient moving right by 3 px a frame, a different ramp in each channel."""
    y, x = np.mgrid[0:height, 0:width]
    out = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        out[i, ..., 0] = (x + 3 * i) * 255 // (width + 3 * frames)
        out[i, ..., 1] = y * 255 // height
        out[i, ..., 2] = 128
    return out


def decode(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize(
    ("frames", "height", "width", "fps"),
    [(14, 48, 64, 7), (25, 576, 1024, 6), (1, 16, 16, 1), (8, 72, 128, 30), (30, 32, 32, 25)],
)
def test_probe_reports_what_was_encoded(frames, height, width, fps):
    info = probe_video(encode_mp4(clip(frames, height, width), fps))
    assert info == {
        "codec": "h264",
        "pix_fmt": "yuv420p",
        "frames": frames,
        "fps": fps,
        "width": width,
        "height": height,
        "faststart": True,
    }


@pytest.mark.parametrize(("height", "width"), [(47, 64), (48, 63), (47, 63), (1, 1)])
def test_odd_sizes_are_padded_to_even(height, width):
    frames = clip(3, height, width)
    data = encode_mp4(frames, 7)
    info = probe_video(data)
    assert (info["height"], info["width"]) == (height + height % 2, width + width % 2)
    out = decode(data)
    assert np.abs(out[:, :height, :width].astype(int) - frames).mean() < 4
    # the added row/column repeats the edge, so it looks like its neighbour, not black
    assert np.abs(out[:, -1].astype(int) - out[:, -2]).mean() < 6
    assert np.abs(out[:, :, -1].astype(int) - out[:, :, -2]).mean() < 6


@pytest.mark.parametrize("colour", [(220, 30, 40), (20, 200, 60), (30, 40, 210), (128, 128, 128)])
def test_colours_survive(colour):
    frames = np.empty((4, 48, 64, 3), np.uint8)
    frames[...] = colour
    first = decode(encode_mp4(frames, 7))[0]
    assert np.abs(first.reshape(-1, 3).mean(axis=0) - colour).max() < 3


def test_frames_survive_compression():
    frames = clip()
    out = decode(encode_mp4(frames, 7))
    assert out.shape == frames.shape
    assert np.abs(out.astype(int) - frames).mean() < 3


def test_crf_trades_size_for_quality():
    frames = np.random.default_rng(0).integers(0, 256, (6, 48, 64, 3), dtype=np.uint8)
    assert len(encode_mp4(frames, 7, crf=40)) < len(encode_mp4(frames, 7, crf=10))


def test_probe_sees_moov_after_mdat():
    """An MP4 written without faststart: probe_video must say so."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=7)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for rgb in clip():
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode(None))
    data = buf.getvalue()
    assert data.index(b"mdat") < data.index(b"moov")
    assert probe_video(data)["faststart"] is False
    assert probe_video(data)["frames"] == 14


BAD_INPUTS = {
    "float frames": (clip().astype(np.float32), 7),
    "int16 frames": (clip().astype(np.int16), 7),
    "one frame, 3-D": (clip()[0], 7),
    "4 channels": (np.zeros((2, 16, 16, 4), np.uint8), 7),
    "grey": (np.zeros((2, 16, 16, 1), np.uint8), 7),
    "no frames": (np.zeros((0, 16, 16, 3), np.uint8), 7),
    "zero height": (np.zeros((2, 0, 16, 3), np.uint8), 7),
    "fps 0": (clip(), 0),
    "fps -1": (clip(), -1),
    "fps 7.5": (clip(), 7.5),
    "fps True": (clip(), True),
}


@pytest.mark.parametrize(("frames", "fps"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_are_value_errors(frames, fps):
    with pytest.raises(ValueError):
        encode_mp4(frames, fps)
