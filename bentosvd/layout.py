"""Channels-last activations between the UNet's compiled blocks.

The fast path compiles the UNet block by block. Inside a block Inductor runs the 2-D
convolutions channels-last (NHWC), the layout cuDNN's fp16 kernels want, but each block
returns the strides eager PyTorch would give its output: contiguous NCHW, since SVD's
transformer blocks end in `.contiguous()`. So every ResNet block opened with a Triton
kernel (group norm and SiLU) that also transposed its input for the convolution after
it, up to 3.5 ms for a [50, 960, 72, 128] input that one plain pass reads and writes in
about 0.6 ms (H100, 2026-11-28 run p), and the eager up- and down-sampling convolutions
between the blocks had cuDNN transpose theirs.

`channels_last_output` makes a block's output channels-last inside its compiled code, so
Inductor writes it that way to begin with; with the UNet's 2-D convolution weights
channels-last too, the eager layers between the blocks (conv_in, the samplers, the skip
connections' concatenation) hand channels-last on, and every block gets and returns it.
A guided step took 420.9 ms instead of 428.0 ms, the fused Triton kernels 123.5 ms
instead of 131.2 ms and the transposes none instead of 3.1 ms (run q,
docs/bench/layout_probe.py, one process). Only the memory layout changes: the video is
the same within fp16 rounding (62.7 dB lowest per-frame PSNR).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


@functools.cache  # one function per class: blocks of a class share what is compiled from it
def channels_last_output(forward: Callable) -> Callable:
    """`forward` (a block class's) with its 4-D output, or a tuple's or output object's
    first one, made channels-last."""

    def wrapped(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if isinstance(out, torch.Tensor):
            return _channels_last(out)
        if isinstance(out, tuple):
            return (_channels_last(out[0]), *out[1:])
        out.sample = _channels_last(out.sample)  # diffusers' output classes
        return out

    return wrapped


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def use_channels_last_weights(model: torch.nn.Module) -> None:
    """The model's 2-D convolution weights in channels-last, so that eager convolutions
    return channels-last (the temporal layers' rank-5 weights stay as they are)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.to(memory_format=torch.channels_last)
