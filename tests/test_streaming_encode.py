"""bentosvd.media.streaming_encode.StreamingEncode: the server's video encode, fed chunk by chunk while
the rest of the clip is still being decoded (real encodes, read back)."""

from __future__ import annotations

import tempfile
import threading
import time

import numpy as np
import pytest
from test_video import clip

from bentosvd.media import video
from bentosvd.media.streaming_encode import StreamingEncode, encode_output
from bentosvd.media.video import probe_video
from bentosvd.protocol import OutputSpec

SHAPE = (6, 143, 255, 3)  # see test_chunks_make_the_same_file_as_the_whole_clip for the size


def plain(fmt="mp4", **extra):
    return OutputSpec(**{"format": fmt, "fps": 7, "boomerang": False, "interpolate_fps": None,
                         **extra})


def wait_for(condition, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.01)


def encoder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "video-encode"]


@pytest.mark.parametrize("output", [plain(), plain("gif"), plain("webp"), plain(boomerang=True),
                                    plain(interpolate_fps=14)],
                         ids=["mp4", "gif", "webp", "boomerang", "interpolated"])
def test_the_video_is_the_one_the_whole_clip_makes(output):
    frames = clip(*SHAPE[:3])
    encoder = StreamingEncode(SHAPE, output, crf=17, preset="veryfast")
    for chunk in np.split(frames, [2, 3]):
        encoder.add(chunk)
    assert encoder.result() == encode_output(frames, output, crf=17, preset="veryfast")


@pytest.mark.parametrize("output", [plain(), plain(boomerang=True)], ids=["mp4", "boomerang"])
def test_frames_are_encoded_before_the_clip_is_complete(monkeypatch, output):
    taken = []
    bt709 = video._bt709

    def spying(frames):
        for frame in bt709(frames):
            taken.append(frame)
            yield frame

    monkeypatch.setattr(video, "_bt709", spying)
    frames = clip(*SHAPE[:3])
    encoder = StreamingEncode(SHAPE, output, crf=17, preset="veryfast")
    encoder.add(frames[:2])
    wait_for(lambda: len(taken) == 2, "the first chunk's frames reach the encoder")
    encoder.add(frames[2:])
    count = 10 if output.boomerang else 6  # there and back: 2F - 2
    info = probe_video(encoder.result())
    assert (info["codec"], info["frames"]) == ("h264", count)
    assert (info["width"], info["height"]) == (256, 144)
    assert len(taken) == count


@pytest.mark.parametrize("output", [plain(), plain(boomerang=True)], ids=["mp4", "boomerang"])
def test_close_abandons_the_encode_and_leaves_no_files(output, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before = len(encoder_threads())
    encoder = StreamingEncode(SHAPE, output, crf=17, preset="veryfast")
    encoder.add(clip(*SHAPE[:3])[:2])
    encoder.close()  # as the worker does when the generation fails or the caller leaves
    wait_for(lambda: len(encoder_threads()) == before, "the encode thread ends")
    assert list(tmp_path.iterdir()) == []
    assert encoder.result() is None


def test_a_bad_chunk_is_raised_where_the_video_is_awaited():
    encoder = StreamingEncode(SHAPE, plain(), crf=17, preset="veryfast")
    encoder.add(clip(2, 144, 256))
    with pytest.raises(ValueError, match="chunks must be"):
        encoder.result()


def test_too_few_frames_are_an_error_not_a_short_video():
    encoder = StreamingEncode(SHAPE, plain(), crf=17, preset="veryfast")
    encoder.add(clip(4, *SHAPE[1:3]))
    with pytest.raises(ValueError, match="ended after 4 of the clip's 6 frames"):
        encoder.result()
