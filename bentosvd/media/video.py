"""Encoding generated frames to MP4, WebM, GIF or WebP, retiming them, and reading a file back.

Frames are always an (F, H, W, 3) uint8 RGB array. `encode_video` picks the format from
`FORMATS` (`encode_chunks` takes the clip a few frames at a time, encoding while the rest
is still being made); `boomerang` and `interpolate` change the frames before encoding;
`probe_video` describes encoded bytes for checks. Everything runs in-process through
PyAV's bundled FFmpeg.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace
from PIL import Image, ImageSequence

from bentosvd.media.formats import (  # noqa: F401
    FORMATS,
    MAX_INTERPOLATED_FPS,
    X264_PRESETS,
    OutputFormat,
)

# ITU-T H.273 code for BT.709, used for primaries, transfer and matrix alike. sRGB shares
# BT.709's primaries, so tagging all three lets players show the colours the model made
# instead of guessing (they guess BT.601 for small frames, BT.709 for HD ones).
_BT709 = 1


# minterpolate's block matching fails on frames with a side under 32 px.
_MIN_INTERPOLATED_SIDE = 32


def encode_video(frames: np.ndarray, fps: int, fmt: str = "mp4", *, crf: int = 17,
                 preset: str = "veryfast") -> bytes:
    """(F, H, W, 3) uint8 RGB frames → bytes of `fmt` (a key of FORMATS), playing at `fps`.

    - mp4: H.264 (libx264 at `preset`, one of X264_PRESETS), yuv420p tagged BT.709, +faststart; an odd side
      gets one more row or column (see encode_mp4).
    - webm: VP9 (libvpx-vp9) in constant-quality mode, yuv420p tagged BT.709, any size.
    - gif: one 256-colour palette made for the whole clip (palettegen), ordered (Bayer)
      dithering, loops forever. Colours are the format's limit, not a setting.
    - webp: lossy VP8 frames at libwebp quality 80, loops forever.

    `crf` is the constant rate factor for mp4 (0-51) and webm (0-63), each on its codec's
    own scale: lower is better and bigger. gif and webp ignore it (their quality is fixed).
    Raises ValueError for frames that are not a non-empty (F, H, W, 3) uint8 array, for
    fps that is not an integer >= 1 (GIF: 1-50), for an unknown fmt or an out-of-range crf.
    """
    frames = _checked_frames(frames)
    return encode_chunks([frames], frames.shape, fps, fmt, crf=crf, preset=preset)


def encode_chunks(chunks: Iterable[np.ndarray], shape: tuple[int, ...], fps: int,
                  fmt: str = "mp4", *, crf: int = 17, preset: str = "veryfast") -> bytes:
    """As encode_video, for a clip of `shape` (F, H, W, 3) that arrives as consecutive
    (n, H, W, 3) uint8 chunks: each frame is encoded as soon as its chunk comes, so the
    encoding can overlap whatever makes the next chunk (the server decodes the video a
    few frames at a time). The settings are checked before the first chunk is waited for.
    Raises ValueError as encode_video does, and when a chunk has the wrong size or type
    or the chunks end with more or fewer than F frames (nothing is returned then).
    """
    spec = _output_format(fmt)
    shape = _checked_shape(shape)
    fps = _checked_fps(fps, spec.max_fps)
    if spec.max_crf is not None and (
        isinstance(crf, bool)
        or not isinstance(crf, (int, np.integer))
        or not 0 <= crf <= spec.max_crf
    ):
        raise ValueError(f"crf for {fmt} must be an integer 0-{spec.max_crf}, got {crf!r}")
    if fmt == "mp4" and preset not in X264_PRESETS:
        raise ValueError(f"preset must be one of {', '.join(X264_PRESETS)}, got {preset!r}")
    frames = _frames_of(chunks, shape)
    if fmt == "mp4":
        # yuv420p needs even sides: an odd height or width gets a copy of its edge.
        _, h, w, _ = shape
        padded = (np.pad(f, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge") for f in frames)
        # The mp4 muxer moves the moov atom to the front (faststart) by reopening the
        # output by name to copy it, which an in-memory buffer has none of; hence _mux's
        # temporary file.
        return _mux("mp4", "libx264", "yuv420p", _bt709(padded),
                    (shape[0], h + h % 2, w + w % 2, 3), fps,
                    {"crf": str(crf), "preset": preset}, {"movflags": "+faststart"})
    if fmt == "webm":
        # b=0 makes crf the only target (constant quality). deadline=good with cpu-used=5 is
        # the fast end of libvpx's good-quality mode: faster than cpu-used=4 for no bigger
        # file; row-mt lets several threads share each frame.
        options = {"crf": str(crf), "b": "0", "deadline": "good", "cpu-used": "5", "row-mt": "1"}
        return _mux("webm", "libvpx-vp9", "yuv420p", _bt709(frames), shape, fps, options)
    if fmt == "gif":
        # The gif muxer's loop=0 writes the NETSCAPE2.0 block that means "loop forever".
        return _mux("gif", "gif", "pal8", _paletted(frames, shape, fps), shape, fps, {},
                    {"loop": "0"})
    # libwebp (not libwebp_anim): the webp muxer then times each frame from its pts, which
    # keeps the clip's total exact; libwebp_anim's own timing came out short. RGB goes in
    # as-is (bgra), so libwebp converts it with WebP's own matrix. The muxer's default
    # loop is 1 (play once).
    rgb = (av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="bgra")
           for f in frames)
    return _mux("webp", "libwebp", "bgra", rgb, shape, fps, {"quality": "80"},
                {"loop": "0"})


def encode_mp4(
    frames: np.ndarray, fps: int, *, crf: int = 17, preset: str = "veryfast"
) -> bytes:
    """(F, H, W, 3) uint8 RGB frames → MP4 bytes: H.264 (libx264), yuv420p, +faststart, fps as given.

    yuv420p needs even sides, so an odd height or width gets one more row or column,
    a copy of the edge. `crf` and `preset` are libx264's (lower crf: better, bigger).
    Raises ValueError for anything but a non-empty (F, H, W, 3) uint8 array, for fps < 1,
    a crf outside 0-51 or a preset not in X264_PRESETS.
    """
    return encode_video(frames, fps, "mp4", crf=crf, preset=preset)


def boomerang(frames: np.ndarray) -> np.ndarray:
    """Frames played forward then backward, for a clip that loops without a jump.

    The turning frames are not repeated: F frames give 2F-2 (frames 0..F-1, then F-2..1),
    so looping the result never shows a frame twice in a row; F=1 gives the one frame.
    Raises ValueError for frames that are not a non-empty (F, H, W, 3) uint8 array.
    """
    frames = _checked_frames(frames)
    return np.concatenate(list(boomerang_chunks([frames])))


def boomerang_chunks(chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """boomerang for a clip that arrives in chunks (as encode_chunks takes it): each chunk
    as it comes, then the way back once the last one is in; boomerang_length(F) frames."""
    kept = []
    for chunk in chunks:
        kept.append(chunk)
        yield chunk
    if kept:
        yield np.concatenate(kept)[-2:0:-1]


def boomerang_length(frames: int) -> int:
    """How many frames boomerang makes of `frames`."""
    return max(1, 2 * frames - 2)


def interpolate(frames: np.ndarray, fps: int, target_fps: int) -> np.ndarray:
    """Raise the frame rate from `fps` to `target_fps` with motion-compensated in-between frames.

    FFmpeg's minterpolate filter (mi_mode=mci: block motion search both ways, overlapped
    blocks, variable block size) makes the new frames; at a scene cut it repeats a frame
    instead of morphing. The result has a frame at every time j/target_fps from the first
    input frame to the last, so (F-1)*target_fps // fps + 1 frames; it plays
    1/fps - 1/target_fps s shorter than the input, as nothing follows the last frame.
    Where j/target_fps is an input frame's time (every k-th frame when target_fps = k*fps)
    the input frame itself is returned. The motion search runs on the CPU and costs
    time for every added frame, seconds per clip at full size (docs/performance.md, per
    request: steps, frames and size).

    `target_fps` is any integer from fps to MAX_INTERPOLATED_FPS (equal to fps, or a single
    frame: the frames come back unchanged). Frames under 32 px a side are edge-padded
    for the motion search and cropped back.
    Raises ValueError for bad frames, fps not an integer >= 1, or target_fps out of range.
    """
    frames = _checked_frames(frames)
    fps = _checked_fps(fps)
    if (
        isinstance(target_fps, bool)
        or not isinstance(target_fps, (int, np.integer))
        or not fps <= target_fps <= MAX_INTERPOLATED_FPS
    ):
        raise ValueError(
            f"target_fps must be an integer from fps ({fps}) to {MAX_INTERPOLATED_FPS}, "
            f"got {target_fps!r}"
        )
    target_fps = int(target_fps)
    count = (len(frames) - 1) * target_fps // fps + 1
    if count == len(frames):
        return frames.copy()

    _, h, w, _ = frames.shape
    pad_h, pad_w = max(0, _MIN_INTERPOLATED_SIDE - h), max(0, _MIN_INTERPOLATED_SIDE - w)
    padded = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    graph = av.filter.Graph()
    chain = [
        graph.add_buffer(width=w + pad_w, height=h + pad_h, format="rgb24",
                         time_base=Fraction(1, fps)),
        # minterpolate takes only YUV; 4:4:4 keeps the colour at full resolution.
        graph.add("format", "yuv444p"),
        graph.add("minterpolate",
                  f"fps={target_fps}:mi_mode=mci:mc_mode=aobmc:me_mode=bidir:vsbmc=1"),
        graph.add("format", "rgb24"),
        graph.add("buffersink"),
    ]
    for a, b in zip(chain, chain[1:]):
        a.link_to(b)
    graph.configure()
    # minterpolate stops at the second-to-last frame it was given; two copies of the last
    # frame make sure the span up to the real last frame comes out, and the rest is cut.
    tail = np.repeat(padded[-1:], 2, axis=0)
    out = [
        frame.to_ndarray(format="rgb24")[:h, :w]
        for frame in _filtered(graph, _rgb_frames(np.concatenate([padded, tail]), fps))
    ]
    if len(out) < count:
        raise RuntimeError(f"minterpolate made {len(out)} frames, expected at least {count}")
    result = np.stack(out[:count])
    # Output j*T/g is input j*fps/g (g = gcd): put the untouched input frames back there,
    # rather than their round trip through YUV.
    g = np.gcd(fps, target_fps)
    result[:: target_fps // g] = frames[:: fps // g]
    return result


def probe_video(data: bytes) -> dict:
    """Describe encoded video bytes: format, codec, pix_fmt, frames, fps, width, height, faststart.

    `format` is "mp4", "webm", "gif" or "webp" (another container's FFmpeg name otherwise).
    `frames` counts decoded frames (not the container's claim). `fps` is a Fraction: the
    stream's average rate for mp4/webm; for gif/webp, whose frames carry only durations,
    frames / total duration (None if there is none). `faststart` is True when an MP4's
    top-level moov box comes before mdat, so playback can start while downloading; it is
    False for other formats. `pix_fmt` is None for webp.

    FFmpeg 8.1 (in PyAV 18) cannot decode animated WebP, so WebP is read with Pillow.
    """
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _probe_webp(data)
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        frames, duration = 0, 0
        for packet in container.demux(stream):
            duration += packet.duration or 0
            frames += len(packet.decode())
        fmt = _DEMUXERS.get(container.format.name, container.format.name)
        fps = stream.average_rate
        if fmt == "gif":  # the gif demuxer's average rate is a guess, the delays are facts
            fps = Fraction(frames) / (duration * stream.time_base) if duration else None
        cc = stream.codec_context
        return {
            "format": fmt,
            "codec": cc.name,
            "pix_fmt": cc.pix_fmt,
            "frames": frames,
            "fps": fps,
            "width": cc.width,
            "height": cc.height,
            "faststart": fmt == "mp4" and _moov_before_mdat(data),
        }


_DEMUXERS = {"mov,mp4,m4a,3gp,3g2,mj2": "mp4", "matroska,webm": "webm", "gif": "gif"}


def _output_format(fmt: str) -> OutputFormat:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    return FORMATS[fmt]


def _checked_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if frames.shape[0] < 1 or frames.shape[1] < 1 or frames.shape[2] < 1:
        raise ValueError(f"frames must hold at least one non-empty frame, got {frames.shape}")
    return frames


def _checked_shape(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    shape = tuple(int(n) for n in shape)
    if len(shape) != 4 or shape[-1] != 3 or min(shape) < 1:
        raise ValueError(f"a clip's shape must be (F, H, W, 3) with F, H, W >= 1, got {shape}")
    return shape


def _frames_of(chunks: Iterable[np.ndarray],
               shape: tuple[int, int, int, int]) -> Iterator[np.ndarray]:
    """Each (H, W, 3) frame of the chunks in turn, checked against the clip's shape."""
    count = 0
    for chunk in chunks:
        chunk = np.asarray(chunk)
        if chunk.dtype != np.uint8 or chunk.ndim != 4 or chunk.shape[1:] != shape[1:]:
            raise ValueError(f"chunks must be (n, {shape[1]}, {shape[2]}, 3) uint8, got "
                             f"{chunk.shape} {chunk.dtype}")
        if count + len(chunk) > shape[0]:
            raise ValueError(f"the chunks hold more than the clip's {shape[0]} frames")
        for frame in chunk:
            count += 1
            yield frame
    if count != shape[0]:
        raise ValueError(f"the chunks ended after {count} of the clip's {shape[0]} frames")


def _checked_fps(fps: int, max_fps: int | None = None) -> int:
    if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)) or fps < 1:
        raise ValueError(f"fps must be an integer >= 1, got {fps!r}")
    if max_fps is not None and fps > max_fps:
        raise ValueError(f"fps must be at most {max_fps} for this format, got {fps}")
    return int(fps)


def _rgb_frames(frames: Iterable[np.ndarray], fps: int) -> Iterator[av.VideoFrame]:
    for i, rgb in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts, frame.time_base = i, Fraction(1, fps)
        yield frame


def _bt709(frames: Iterable[np.ndarray]) -> Iterator[av.VideoFrame]:
    """RGB → limited-range BT.709 yuv420p, matching the tags _mux puts on the stream."""
    for rgb in frames:
        yield av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
            format="yuv420p",
            dst_colorspace=Colorspace.ITU709,
            dst_color_range=ColorRange.MPEG,
            dst_color_trc=_BT709,
            dst_color_primaries=_BT709,
        )


def _paletted(frames: Iterable[np.ndarray], shape: tuple[int, ...],
              fps: int) -> Iterator[av.VideoFrame]:
    """pal8 frames sharing one palette made from every pixel of the clip.

    palettegen sees the whole clip before paletteuse maps the first frame, so the frames
    wait in the graph (about one more copy of the clip in memory). Bayer dithering is a
    fixed pattern: unlike error diffusion it does not crawl from frame to frame, which
    keeps the GIF smaller, and it is quicker to apply.
    """
    _, h, w, _ = shape
    graph = av.filter.Graph()
    source = graph.add_buffer(width=w, height=h, format="rgb24", time_base=Fraction(1, fps))
    split = graph.add("split")
    palettegen = graph.add("palettegen", "stats_mode=full")
    paletteuse = graph.add("paletteuse", "dither=bayer:bayer_scale=3:diff_mode=rectangle")
    source.link_to(split)
    split.link_to(palettegen, 0, 0)
    split.link_to(paletteuse, 1, 0)
    palettegen.link_to(paletteuse, 0, 1)
    paletteuse.link_to(graph.add("buffersink"))
    graph.configure()
    return _filtered(graph, _rgb_frames(frames, fps))


def _filtered(graph: av.filter.Graph, frames: Iterable[av.VideoFrame]) -> Iterator[av.VideoFrame]:
    """Push frames through a configured one-input graph, yielding what comes out."""
    for frame in frames:
        graph.push(frame)
        yield from _drain(graph)
    graph.push(None)
    yield from _drain(graph)


def _drain(graph: av.filter.Graph) -> Iterator[av.VideoFrame]:
    while True:
        try:
            yield graph.pull()
        except (av.error.BlockingIOError, av.error.EOFError):
            return


def _mux(
    container: str,
    codec: str,
    pix_fmt: str,
    frames: Iterable[av.VideoFrame],
    shape: tuple[int, ...],
    fps: int,
    options: dict[str, str],
    container_options: dict[str, str] | None = None,
) -> bytes:
    """Encode frames (already in pix_fmt) with frame i at i/fps; return the file's bytes."""
    # A temporary file rather than a buffer: the mp4 muxer's faststart reopens it by name.
    with tempfile.TemporaryDirectory(prefix="bentosvd-") as tmp:
        path = os.path.join(tmp, "out")
        with av.open(path, mode="w", format=container, options=container_options or {}) as out:
            # rate=fps gives the codec a 1/fps time base: frame i has pts i, so the rate is exact.
            stream = out.add_stream(codec, rate=fps)
            stream.height, stream.width = shape[1:3]
            stream.pix_fmt = pix_fmt
            stream.options = options
            if pix_fmt == "yuv420p":  # these frames come from _bt709; say so in the stream
                cc = stream.codec_context
                cc.colorspace = cc.color_primaries = cc.color_trc = _BT709
                cc.color_range = ColorRange.MPEG
            for i, frame in enumerate(frames):
                frame.pts, frame.time_base = i, Fraction(1, fps)
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))  # flush the frames the encoder still holds
        with open(path, "rb") as f:
            return f.read()


def _probe_webp(data: bytes) -> dict:
    with Image.open(io.BytesIO(data)) as image:
        durations = []
        for frame in ImageSequence.Iterator(image):
            frame.load()  # decodes it, and sets its duration in ms
            durations.append(frame.info.get("duration", 0))
        total = sum(durations)
        return {
            "format": "webp",
            "codec": "webp",
            "pix_fmt": None,
            "frames": len(durations),
            "fps": Fraction(1000 * len(durations), total) if total else None,
            "width": image.width,
            "height": image.height,
            "faststart": False,
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
