"""RIFE on a clip while it is being decoded: each decoded chunk of frames, still on the GPU,
gives the output frames it completes, so the video encode starts before the last chunk.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from bentosvd.rife.ifnet import IFNet
from bentosvd.rife.interpolate import interpolate_frames, times_for_fps


class StreamingInterpolation:
    """Raises a clip from `fps` to `target_fps` with `model`, fed in order.

    `feed(chunk)` takes the next decoded frames, (n, H, W, 3) uint8 on any device, and
    returns the output frames whose time has been reached (possibly none), on the same
    device. Over the whole clip they are `len(self.times)` frames (`times_for_fps`), frame
    j shown at j / target_fps; source frames are kept exactly where the timeline meets them."""

    def __init__(self, model: IFNet, num_frames: int, fps: int, target_fps: int,
                 batch_size: int = 8):
        self.model, self.batch_size = model, batch_size
        self.times: list[Fraction] = times_for_fps(num_frames, fps, target_fps)
        self._next = 0  # the next output frame to make
        self._received = 0  # source frames fed so far
        self._tail: torch.Tensor | None = None  # the last of them, to interpolate from

    def feed(self, chunk: torch.Tensor) -> torch.Tensor:
        if len(chunk) == 0:
            return chunk
        window = chunk if self._tail is None else torch.cat([self._tail, chunk])
        base = self._received - (0 if self._tail is None else 1)  # the window's first frame
        self._received += len(chunk)
        self._tail = chunk[-1:]
        end = self._next
        while end < len(self.times) and self.times[end] <= self._received - 1:
            end += 1
        times = [t - base for t in self.times[self._next:end]]
        self._next = end
        if not times:
            return chunk[:0]
        return interpolate_frames(self.model, window, times=times, batch_size=self.batch_size)


__all__ = ["StreamingInterpolation"]
