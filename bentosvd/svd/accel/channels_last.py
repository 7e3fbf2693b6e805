"""Channels-last activations between the UNet's compiled blocks.

The fast path compiles the UNet block by block (`bentosvd.svd.compiled_blocks`). Inside a
block Inductor runs the 2-D convolutions channels-last (NHWC), the layout cuDNN's fp16
kernels want, but each block returns the strides eager PyTorch would give its output:
contiguous NCHW, since SVD's transformer blocks end in `.contiguous()`. So every ResNet
block opened with a Triton kernel (group norm and SiLU) that also transposed its input for
the convolution after it, far slower than a plain pass over the same tensor, and the
eager up- and down-sampling convolutions between the blocks had cuDNN transpose theirs.

`channels_last_output` makes a block's output channels-last inside its compiled code, so
Inductor writes it that way to begin with. The eager layers between the blocks (the
samplers' convolutions, the skip connections' concatenation) hand channels-last on,
since an eager convolution returns the layout of its input; only conv_in's output, from
the NCHW latents, is NCHW, so the two blocks it feeds (the first one, and the last
through its skip connection) get NCHW. The convolution weights stay NCHW: channels-last
weights made the compiled step no faster and the uncompiled fallback slower. Only the
memory layout changes: the video is the same within fp16 rounding (docs/performance.md,
channels-last between blocks).

Run eagerly, which is how the server runs a shape its warm-up did not compile, the
output is left as the block made it: eager blocks and convolutions run slower on
channels-last activations, so the fallback stays NCHW.
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
