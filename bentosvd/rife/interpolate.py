"""Raising a clip's frame rate with RIFE: the output timeline and the frames on it.

A timeline lists, for each output frame, its time in source frames: 0 is the first source
frame, 1 the second, 2.5 halfway between the third and the fourth. Where a time is a whole
number the source frame is copied as it is; anywhere else IFNet makes the frame from the
two source frames around it. Times are exact fractions, so "is this a source frame" never
depends on rounding.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from fractions import Fraction

import torch
import torch.nn.functional as F

from bentosvd.rife.ifnet import IFNet


def times_for_multiplier(num_frames: int, multiplier: int) -> list[Fraction]:
    """The timeline with `multiplier` frames per source frame: (num_frames - 1) * multiplier
    + 1 frames, at 0, 1/multiplier, 2/multiplier, ... up to the last source frame, which is
    where the clip ends (nothing follows it to interpolate towards)."""
    _check_count(num_frames)
    if isinstance(multiplier, bool) or not isinstance(multiplier, numbers.Integral) or multiplier < 1:
        raise ValueError(f"multiplier must be an integer >= 1, got {multiplier!r}")
    return [Fraction(j, multiplier) for j in range((num_frames - 1) * multiplier + 1)]


def times_for_fps(num_frames: int, fps: int | Fraction, target_fps: int | Fraction) -> list[Fraction]:
    """The timeline of a clip at `target_fps` made from num_frames frames at `fps`.

    Output frame j is shown at j / target_fps seconds, source frame i at i / fps, so frame j
    sits at source time j * fps / target_fps. The clip runs from the first source frame to
    the last: (num_frames - 1) * target_fps // fps + 1 frames (25 frames at 7 fps make 49 at
    14 fps and 35 at 10 fps), the same count as bentosvd.media.video.interpolate. With
    target_fps = k * fps this is times_for_multiplier(num_frames, k).
    fps and target_fps: positive integers or Fractions (30000/1001 for NTSC's 29.97).
    """
    _check_count(num_frames)
    fps, target_fps = _checked_rate("fps", fps), _checked_rate("target_fps", target_fps)
    count = math.floor((num_frames - 1) * target_fps / fps) + 1
    step = fps / target_fps
    return [j * step for j in range(count)]


@torch.inference_mode()
def interpolate_frames(
    model: IFNet,
    frames: torch.Tensor,
    *,
    times: Sequence[numbers.Real],
    batch_size: int = 8,
    scale: float = 1.0,
) -> torch.Tensor:
    """The frames at `times` (see times_for_multiplier and times_for_fps), made from `frames`.

    frames: uint8 (N, H, W, 3) RGB on any device; any H and W (the model's input is
    zero-padded on the right and bottom to `IFNet.pad_multiple(scale)` and cropped back,
    as the authors do). times: one per output frame, in source frames (ints or Fractions;
    a float is taken at its exact binary value), each within [0, N - 1], in any order.
    Where a time is a whole number the source frame is copied bit for bit.
    batch_size: how many in-between frames go through the model at once; more keeps a
    GPU busier and costs activation memory in proportion. scale: the flow's resolution
    (IFNet.forward).

    The model runs on its own device in its own dtype (on a GPU, float16 needs less
    memory than float32); the result is uint8 (len(times), H, W, 3) on frames' device.
    Each source frame a new frame needs is converted (and, for 4.7+, encoded) once, so
    all of them are held on the model's device at once, padded, in its dtype.
    Raises ValueError for bad frames, times out of range or a bad batch_size.
    """
    _check_frames(frames)
    count, height, width, _ = frames.shape
    positions = [_checked_time(t, count) for t in times]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    multiple = model.pad_multiple(scale)

    result = torch.empty((len(positions), height, width, 3), dtype=torch.uint8, device=frames.device)
    new_frames = []  # (output index, source frame before it, time past that frame)
    for j, position in enumerate(positions):
        before = math.floor(position)
        if position == before:
            result[j] = frames[before]
        else:
            new_frames.append((j, before, position - before))
    if not new_frames:
        return result

    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    used = sorted({before + k for _, before, _ in new_frames for k in (0, 1)})
    row = {index: r for r, index in enumerate(used)}
    images = frames[used].to(device).permute(0, 3, 1, 2).to(dtype).div_(255)
    padded_height, padded_width = -(-height // multiple) * multiple, -(-width // multiple) * multiple
    images = F.pad(images, (0, padded_width - width, 0, padded_height - height))
    features = model.features(images)

    for start in range(0, len(new_frames), batch_size):
        batch = new_frames[start:start + batch_size]
        rows0 = torch.tensor([row[before] for _, before, _ in batch], device=device)
        rows1 = torch.tensor([row[before + 1] for _, before, _ in batch], device=device)
        t = torch.tensor([float(fraction) for _, _, fraction in batch], dtype=dtype, device=device)
        pair_features = None if features is None else (features[rows0], features[rows1])
        made = model(images[rows0], images[rows1], t, scale=scale, features=pair_features)
        made = made[:, :, :height, :width].clamp(0, 1).mul(255).round().to(torch.uint8)
        outputs = torch.tensor([j for j, _, _ in batch], device=frames.device)
        result[outputs] = made.permute(0, 2, 3, 1).to(frames.device)
    return result


def _check_count(num_frames: int) -> None:
    if isinstance(num_frames, bool) or not isinstance(num_frames, numbers.Integral) or num_frames < 1:
        raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}")


def _checked_rate(name: str, rate: int | Fraction) -> Fraction:
    if isinstance(rate, bool) or not isinstance(rate, numbers.Rational) or rate <= 0:
        raise ValueError(f"{name} must be a positive integer or Fraction, got {rate!r}")
    return Fraction(rate)


def _check_frames(frames: torch.Tensor) -> None:
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be a uint8 tensor, got {getattr(frames, 'dtype', type(frames))}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be (N, H, W, 3) with N >= 1, got {tuple(frames.shape)}")


def _checked_time(time: numbers.Real, count: int) -> Fraction:
    if isinstance(time, bool) or not isinstance(time, numbers.Real) or not math.isfinite(time):
        raise ValueError(f"times must be numbers, got {time!r}")
    position = Fraction(time)
    if not 0 <= position <= count - 1:
        raise ValueError(f"time {time} is outside the clip's {count} frames (0 to {count - 1})")
    return position
