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
Inductor writes it that way to begin with. The eager layers between the blocks (the
samplers' convolutions, the skip connections' concatenation) hand channels-last on,
since an eager convolution returns the layout of its input; only conv_in's output, from
the NCHW latents, is NCHW, so the two blocks it feeds (the first one, and the last
through its skip connection) get NCHW. A guided step took 420.9 ms instead of 428.0 ms
(H100, run q, with the convolution weights channels-last too), and 402.2 ms on an H200
with the weights left NCHW, against 405.7 ms with them channels-last (run u,
docs/bench/layout_probe.py, one process). Only the memory layout changes: the video is
the same within fp16 rounding (62.7 dB lowest per-frame PSNR).

Run eagerly, which is how the server runs a shape its warm-up did not compile, the
output is left as the block made it: eager blocks and convolutions on channels-last
activations made a step 12% slower (0.658 s against 0.589 s, H200, run t,
docs/bench/fallback_probe.py), so the fallback stays NCHW (0.584 s, run v).
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
        if not torch.compiler.is_compiling():
            return out  # run eagerly (a shape not warmed up): NCHW, as eager runs best
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
    return channels-last whatever their input (the temporal layers' rank-5 weights stay as
    they are). For `Speedups.channels_last`; channels-last blocks leave the weights NCHW."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.to(memory_format=torch.channels_last)
