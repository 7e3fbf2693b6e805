"""Encoding generated frames to MP4 (H.264), and reading an MP4 back for checks."""

from __future__ import annotations

import io
import os
import struct
import tempfile
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace

# ITU-T H.273 code for BT.709, used for primaries, transfer and matrix alike. sRGB shares
# BT.709's primaries, so tagging all three lets players show the colours the model made
# instead of guessing (they guess BT.601 for small frames, BT.709 for HD ones).
_BT709 = 1


def encode_mp4(
    frames: np.ndarray, fps: int, *, crf: int = 17, preset: str = "medium"
) -> bytes:
    """(F, H, W, 3) uint8 RGB frames → MP4 bytes: H.264 (libx264), yuv420p, +faststart, fps as given.

    yuv420p needs even sides, so an odd height or width gets one more row or column,
    a copy of the edge. `crf` and `preset` are libx264's (lower crf: better, bigger).
    Raises ValueError for anything but a non-empty (F, H, W, 3) uint8 array or for fps < 1.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if frames.shape[0] < 1 or frames.shape[1] < 1 or frames.shape[2] < 1:
        raise ValueError(f"frames must hold at least one non-empty frame, got {frames.shape}")
    if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)) or fps < 1:
        raise ValueError(f"fps must be an integer >= 1, got {fps!r}")

    _, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")

    # The mp4 muxer moves the moov atom to the front (faststart) by reopening the output
    # by name to copy it, which an in-memory buffer has none of; so write a temporary file.
    with tempfile.TemporaryDirectory(prefix="bentosvd-") as tmp:
        path = os.path.join(tmp, "out.mp4")
        with av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
            # rate=fps gives the codec a 1/fps time base: frame i has pts i, so the rate is exact.
            stream = out.add_stream("libx264", rate=int(fps))
            stream.height, stream.width = frames.shape[1:3]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf), "preset": preset}
            cc = stream.codec_context
            cc.colorspace = cc.color_primaries = cc.color_trc = _BT709
            cc.color_range = ColorRange.MPEG
            for i, rgb in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
                    format="yuv420p",
                    dst_colorspace=Colorspace.ITU709,
                    dst_color_range=ColorRange.MPEG,
                    dst_color_trc=_BT709,
                    dst_color_primaries=_BT709,
                )
                frame.pts, frame.time_base = i, Fraction(1, int(fps))
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))  # flush the frames the encoder still holds
        with open(path, "rb") as f:
            return f.read()


def probe_video(data: bytes) -> dict:
    """Describe MP4 bytes: codec, pix_fmt, frames, fps, width, height, faststart.

    `frames` counts decoded frames (not the container's claim); `fps` is the stream's
    average rate as a Fraction (None if the container has none); `faststart` is True
    when the top-level moov box comes before mdat, so playback can start while downloading.
    """
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        cc = stream.codec_context
        return {
            "codec": cc.name,
            "pix_fmt": cc.pix_fmt,
            "frames": frames,
            "fps": stream.average_rate,
            "width": cc.width,
            "height": cc.height,
            "faststart": _moov_before_mdat(data),
        }


def _moov_before_mdat(data: bytes) -> bool:
    """Walk the top-level ISO-BMFF boxes (searching for b"moov" could hit bytes in mdat)."""
    pos = 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, pos)
        if size == 1:  # 64-bit size follows the type
            if pos + 16 > len(data):
                return False
            (size,) = struct.unpack_from(">Q", data, pos + 8)
        elif size == 0:  # box runs to the end of the file
            size = len(data) - pos
        if kind == b"moov":
            return True
        if kind == b"mdat" or size < 8:
            return False
        pos += size
    return False
