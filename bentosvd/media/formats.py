"""The output formats, the x264 presets and the interpolation limit: facts that the request
schema (`bentosvd.config.Params`), the settings and the video encoder all read from here.
No heavy imports, so the schema and the CLI stay light."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OutputFormat:
    """One output format: what to call it over HTTP and on disk, and its limits."""

    name: str
    media_type: str
    extension: str
    codec: str  # the codec name probe_video reports for it
    max_crf: int | None  # None: the format takes no crf (its quality is fixed)
    max_fps: int | None = None


FORMATS: dict[str, OutputFormat] = {
    f.name: f
    for f in (
        OutputFormat("mp4", "video/mp4", ".mp4", "h264", max_crf=51),
        OutputFormat("webm", "video/webm", ".webm", "vp9", max_crf=63),
        # GIF delays are in 1/100 s and browsers slow any delay under 2/100 s to 1/10 s.
        OutputFormat("gif", "image/gif", ".gif", "gif", max_crf=None, max_fps=50),
        OutputFormat("webp", "image/webp", ".webp", "webp", max_crf=None),
    )
}
"""The formats encode_video writes, by name. Frame i starts at i/fps rounded to the
container's clock: MP4 exact, WebM 1 ms, GIF 1/100 s, WebP 1 ms. probe_video reads back
exactly fps for MP4 and WebM, and for GIF and WebP where fps divides 100 or 1000 (GIF: 1, 2,
4, 5, 10, 20, 25, 50). Otherwise single frames are up to one tick long or short (GIF at
7 fps: delays of 14 and 15 hundredths) and the whole clip stays within one tick of F/fps.
GIF and WebP loop forever; a single frame makes a still WebP."""

MAX_INTERPOLATED_FPS = 60
"""Highest frame rate interpolate() makes: each added frame costs a motion search."""

# libx264's speed presets, fastest first. The server's default is veryfast: much faster
# than medium at the same crf, for a file of about the same size and slightly lower quality
# (docs/performance.md, streaming encode).
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow",
                "slower", "veryslow")
