"""Frame interpolation as served: RIFE on the worker as the frames are decoded (the demo
registers a tiny random RIFE, as `make serve` does), or FFmpeg's minterpolate in the
encode. Frame counts, exact timestamps, every format, boomerang, the header that says
what was done, and the params that disagree. The network itself is tests/test_rife.py's.
"""

from __future__ import annotations

from fractions import Fraction

import httpx
import numpy as np
import pytest
import torch

from bentosvd.api.planning import plan_generation
from bentosvd.config import VARIANTS, Params
from bentosvd.errors import InvalidParams
from bentosvd.media.video import probe_video
from bentosvd.rife.ifnet import build_random
from bentosvd.rife.interpolate import interpolate_frames, times_for_fps
from bentosvd.rife.stream import StreamingInterpolation
from tests.test_service import assert_video, frames_at, post
from tests.test_video import decode

DEMO = VARIANTS["demo"]


@pytest.mark.parametrize("chunks", [[8], [1] * 8, [3, 3, 2], [2, 5, 1]])
@pytest.mark.parametrize(("fps", "target"), [(7, 14), (7, 28), (7, 10), (6, 25)])
def test_streaming_gives_the_whole_clips_frames_whatever_the_chunks(chunks, fps, target):
    model = build_random("demo")
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 40, 56, 3), dtype=np.uint8))
    times = times_for_fps(8, fps, target)
    whole = interpolate_frames(model, frames, times=times)
    stream = StreamingInterpolation(model, 8, fps, target)
    got, first = [], 0
    for n in chunks:
        got.append(stream.feed(frames[first:first + n]))
        first += n
    got = torch.cat(got)
    assert len(got) == len(times) == (8 - 1) * target // fps + 1
    assert torch.equal(got, whole)
    for j, t in enumerate(times):  # the source frames, untouched, where the timeline meets them
        if t.denominator == 1:
            assert torch.equal(got[j], frames[int(t)])


def test_params_that_disagree_are_refused_naming_the_field():
    with pytest.raises(InvalidParams) as error:
        plan_generation(Params(interpolation="rife"), DEMO, "mp4", rife=True)
    assert error.value.field == "params.interpolation" and "interpolate_fps" in error.value.fix
    with pytest.raises(InvalidParams) as error:
        plan_generation(Params(interpolation="rife", interpolate_fps=14), DEMO, "mp4", rife=False)
    assert error.value.field == "params.interpolation" and "no RIFE model" in str(error.value)
    # The default follows what the server has.
    for rife, method in ((True, "rife"), (False, "minterpolate")):
        _, output = plan_generation(Params(interpolate_fps=14), DEMO, "mp4", rife=rife)
        assert output.interpolation == method


@pytest.mark.server
def test_the_blog_curl_with_rife_doubles_the_frame_rate(server, test_image):
    response = post(server, test_image, {"interpolation": "rife", "interpolate_fps": 14, "seed": 1})
    assert response.status_code == 200, response.text
    assert response.headers["x-interpolation"] == "rife 7->14 fps"
    assert_video(response.content, frames=2 * DEMO.num_frames - 1, fps=14, size=(DEMO.width, DEMO.height))
    info = httpx.get(f"{server.url}/info", timeout=30).json()
    assert info["workers"][0]["rife"].startswith("rife:") and "RIFE 4.6" in info["workers"][0]["rife"]
    assert info["params"]["interpolation"]["enum"] == ["rife", "minterpolate"]


@pytest.mark.server
@pytest.mark.parametrize("target", [28, 10])  # x4, and 7 -> 10 fps
def test_rife_times_are_exact(server, test_image, target):
    frames = frames_at(target)
    response = post(server, test_image, {"interpolate_fps": target, "seed": 2})
    assert response.status_code == 200, response.text
    assert response.headers["x-interpolation"] == f"rife 7->{target} fps"  # the default
    info = assert_video(response.content, frames=frames, fps=target, size=(DEMO.width, DEMO.height))
    assert info["fps"] == Fraction(target)
    # The frames the timeline puts on source frames are the plain generation's frames
    # (through the same x264 encode, so compared within its loss).
    plain = post(server, test_image, {"seed": 2})
    source, made = decode(plain.content), decode(response.content)
    step = Fraction(7, target)
    on_source = [j for j in range(frames) if (j * step).denominator == 1]
    # x4: every 4th; 7 -> 10: every 10th (0, 10, ...)
    assert on_source == list(range(0, frames, 4 if target == 28 else 10))
    for j in on_source:
        diff = np.abs(made[j].astype(int) - source[int(j * step)].astype(int)).mean()
        assert diff < 4, (j, diff)


@pytest.mark.server
@pytest.mark.parametrize("fmt", ["webm", "gif", "webp"])
def test_rife_with_every_format_and_boomerang(server, test_image, fmt):
    response = post(server, test_image, {"interpolate_fps": 14, "format": fmt, "boomerang": True,
                                         "seed": 3})
    assert response.status_code == 200, response.text
    info = probe_video(response.content)
    frames = frames_at(14)
    assert info["format"] == fmt and info["frames"] == 2 * frames - 2, info
    assert info["fps"] == 14 or abs(info["frames"] / info["fps"] - (2 * frames - 2) / 14) < 0.05, info


@pytest.mark.server
def test_minterpolate_when_asked(server, test_image):
    response = post(server, test_image, {"interpolation": "minterpolate", "interpolate_fps": 14, "seed": 1})
    assert response.status_code == 200, response.text
    assert response.headers["x-interpolation"] == "minterpolate 7->14 fps"
    assert_video(response.content, frames=frames_at(14), fps=14, size=(DEMO.width, DEMO.height))
    bad = post(server, test_image, {"interpolation": "rife"})
    assert bad.status_code == 400 and bad.json()["field"] == "params.interpolation", bad.text
