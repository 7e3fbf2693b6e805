"""The video is encoded while its frames are still being decoded: `StreamingEncode`, in a
thread of its own, and `encode_output`, the same bytes from a whole clip."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future

import numpy as np

from bentosvd.media.video import (
    boomerang,
    boomerang_chunks,
    boomerang_length,
    encode_chunks,
    encode_video,
    interpolate,
)
from bentosvd.protocol import OutputSpec


def encode_output(frames: np.ndarray, output: OutputSpec, *, crf: int, preset: str) -> bytes:
    """Frames → the bytes of the file `output` describes."""
    fps = output.fps
    if output.interpolate_fps:
        frames, fps = interpolate(frames, fps, output.interpolate_fps), output.interpolate_fps
    if output.boomerang:
        frames = boomerang(frames)
    return encode_video(frames, fps, output.format, crf=crf, preset=preset)


class StreamingEncode:
    """Encodes one video in a thread of its own while its frames are still being decoded.

    `add` each chunk of (n, H, W, 3) uint8 frames as it reaches the host, in order; then
    `result()` waits for the bytes, the same bytes `encode_output` makes of the whole clip.
    A clip is encoded frame by frame as its chunks come (a boomerang's way back once the
    last one is in), so by the time the last one is decoded little encoding is left;
    interpolation needs the whole clip and starts once the last chunk is in.

    `close()` abandons the video (the generation failed or nobody waits): the thread stops
    when it next waits for frames, and its temporary file is removed. Call it instead of
    `result()`, or after `result()` has returned (then it does nothing).
    """

    def __init__(self, shape: tuple[int, int, int, int], output: OutputSpec, *, crf: int,
                 preset: str):
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._video: Future[bytes | None] = Future()
        # A daemon thread: one left waiting for frames never holds up the process's exit.
        threading.Thread(target=self._run, args=(shape, output, crf, preset),
                         name="video-encode", daemon=True).start()

    def add(self, frames: np.ndarray) -> None:
        self._chunks.put(frames)

    def result(self) -> bytes:
        self._chunks.put(None)
        return self._video.result()

    def close(self) -> None:
        self._chunks.put(_ABANDONED)

    def _received(self) -> Iterator[np.ndarray]:
        while (chunk := self._chunks.get()) is not None:
            if chunk is _ABANDONED:
                raise _Abandoned
            yield chunk

    def _run(self, shape, output: OutputSpec, crf: int, preset: str) -> None:
        try:
            chunks = self._received()
            if output.interpolate_fps:
                video = encode_output(np.concatenate(list(chunks)), output, crf=crf, preset=preset)
            else:
                if output.boomerang:
                    chunks = boomerang_chunks(chunks)
                    shape = (boomerang_length(shape[0]), *shape[1:])
                video = encode_chunks(chunks, shape, output.fps, output.format,
                                      crf=crf, preset=preset)
            self._video.set_result(video)
        except _Abandoned:
            self._video.set_result(None)
        except BaseException as e:  # handed to whoever waits in result()
            self._video.set_exception(e)


class _Abandoned(Exception):
    pass


_ABANDONED = object()
