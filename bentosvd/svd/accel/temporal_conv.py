"""SVD's temporal convolutions as batched matrix products, without cuDNN's layout transposes.

Each temporal ResNet block of SVD's UNet (22 blocks, 44 convolutions) and of its VAE's
temporal decoder mixes neighbouring frames with a `Conv3d` whose kernel spans frames only,
(3, 1, 1), and so does the decoder's last layer (`time_conv_out`), on the spatial layers'
[batch * frames, channels, height, width] seen as [batch, channels, frames, height, width].

torch.compile's Inductor keeps 2-D convolutions in channels-last (NHWC), the layout cuDNN's
fp16 kernels run in, but gives a 3-D convolution its input's layout (only 2-D convolutions
are converted; see `torch/_inductor/kernel/conv.py`), and cuDNN then transposes each 3-D
convolution's input and weight to channels-last and its output back, on every call.
Computed as the 2-D convolution it also is (a (3, 1) kernel over [batch, channels,
frames, height * width]), the layer would be converted to channels-last like the others:
the transposes go, but the convolutions and the fused norm kernels around them, then
channels-last too, cost more than the transposes did, so that was not kept.

`FrameConv` leaves cuDNN nothing to transpose. It pads the clip with a zero frame at
each end of every batch row into one buffer laid out [batch, frames, channels,
height * width] (compiled, the norm kernel before it writes that buffer directly, a pass
it makes anyway). There, three consecutive frames are one [3 * channels, height * width]
matrix, and output frame f is the product of the kernel's three taps side by side
([out channels, 3 * channels]) with the window of frames f-1..f+1: one batched matrix
product over overlapping windows of one buffer (a strided view, nothing copied), whose
output is [batch * frames, out channels, height * width], the spatial layers' own shape.
The windows that straddle two batch rows are computed and dropped (2 of 52 for SVD-XT's
guidance batch of 2). A clip of one frame (the decoder at `decoding_t` 1) takes the
middle tap alone, the only one that meets data. With the activations channels-last
between the UNet's blocks (`bentosvd.svd.accel.channels_last`), the norm kernel writes
that buffer from a channels-last input, transposing inside the pass it makes anyway.

The products cost a little less than the cuDNN convolutions they replace, the fused
kernels around them a little more, and the transposes are gone: both the UNet's steps
and the decoder run faster (docs/performance.md, temporal convolutions as batched
products).

Same parameters and state-dict keys as the `Conv3d`; the same sums of the same products,
so outputs differ by float rounding only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class FrameConv(torch.nn.Conv3d):
    """A `Conv3d` whose kernel spans frames only ((k, 1, 1), odd k, padded to keep the
    frame count), computed as one batched matrix product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, frames, height, width = x.shape
        taps, pixels = self.kernel_size[0], height * width
        # [batch, frames, channels, pixels]: a view of the spatial layers' output.
        clip = x.permute(0, 2, 1, 3, 4).reshape(batch, frames, channels, pixels)
        if frames == 1:
            out = self.weight[:, :, taps // 2].flatten(1) @ clip  # [batch, 1, out, pixels]
        else:
            pad = taps // 2
            # Zero frames around each batch row, in one buffer the windows are read from.
            padded = F.pad(clip, (0, 0, 0, 0, pad, pad)).contiguous()
            length = frames + 2 * pad
            windows = padded.as_strided((batch * length - 2 * pad, taps * channels, pixels),
                                        (channels * pixels, pixels, 1))
            # [out, taps * channels], tap-major like the windows' rows
            kernel = self.weight.flatten(2).transpose(1, 2).flatten(1)
            every = kernel @ windows  # [windows, out, pixels]
            out_channels = every.shape[1]
            out = every.as_strided((batch, frames, out_channels, pixels),
                                   (length * out_channels * pixels, out_channels * pixels, pixels, 1))
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out.unflatten(-1, (height, width)).transpose(1, 2)


def _frames_only(conv: torch.nn.Module) -> bool:
    """A plain Conv3d whose kernel spans frames only, padded to keep the frame count."""
    taps = conv.kernel_size[0] if isinstance(conv, torch.nn.Conv3d) else 0
    return (type(conv) is torch.nn.Conv3d and taps % 2 == 1 and conv.kernel_size[1:] == (1, 1)
            and conv.stride == (1, 1, 1) and conv.dilation == (1, 1, 1) and conv.groups == 1
            and not isinstance(conv.padding, str) and tuple(conv.padding) == (taps // 2, 0, 0)
            and conv.padding_mode == "zeros")


def use_frame_conv(model: torch.nn.Module) -> int:
    """Turn the model's frames-only `Conv3d` layers into `FrameConv`s in place (the same
    objects, parameters and hooks); returns how many."""
    convs = [m for m in model.modules() if _frames_only(m)]
    for conv in convs:
        conv.__class__ = FrameConv
    return len(convs)


def remove_frame_conv(model: torch.nn.Module) -> None:
    """Turn them back into plain `Conv3d`s."""
    for module in model.modules():
        if type(module) is FrameConv:
            module.__class__ = torch.nn.Conv3d
