"""SVD's temporal convolutions as batched matrix products (bentosvd/svd/accel/temporal_conv.py): every
frames-only Conv3d of SVD's UNet and temporal decoder becomes a FrameConv and nothing else
does, it computes what the Conv3d computes whatever the input's layout, the windows are
read in place, it compiles ahead of time with the blocks, and the video stays the same.
Its speed is measured on a GPU (docs/journal.md, 2026-11-28 runs m-o): what it saves
is cuDNN's layout transposes, which this CPU does not run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel

from benchmarks.bench import psnr
from bentosvd.svd.accel.temporal_conv import (
    FrameConv,
    remove_frame_conv,
    use_frame_conv,
)
from bentosvd.svd.compiled_blocks import UNET_REGIONS, SavedRegions
from bentosvd.svd.speedups import Speedups
from bentosvd.weights.random_weights import build_demo
from tests.test_cross_attention import demo_video, unet_inputs


def test_the_fast_path_uses_it():
    assert Speedups.fast().frame_conv
    # Measured only compiled: low-memory mode runs eagerly, as plain diffusers does.
    assert not Speedups.low_memory_mode().frame_conv
    assert not Speedups().frame_conv


def test_every_temporal_conv_of_the_full_size_models_gets_it_and_gives_it_back():
    # SVD's own architectures (weights never materialised): 22 temporal ResNet blocks of
    # two convolutions in the UNet; in the decoder 14 blocks and time_conv_out.
    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel()
        vae = AutoencoderKLTemporalDecoder(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            layers_per_block=2, latent_channels=4, sample_size=768)
    keys = list(unet.state_dict())
    assert use_frame_conv(unet) == 44 and use_frame_conv(vae) == 29
    assert not any(type(m) is torch.nn.Conv3d for m in [*unet.modules(), *vae.modules()])
    assert isinstance(vae.decoder.time_conv_out, FrameConv)
    assert use_frame_conv(unet) == 0  # nothing left to turn
    assert list(unet.state_dict()) == keys  # checkpoints load as before
    remove_frame_conv(unet)
    assert sum(type(m) is torch.nn.Conv3d for m in unet.modules()) == 44
    assert not any(isinstance(m, FrameConv) for m in unet.modules())


@pytest.mark.parametrize("kernel,padding,stride,groups,padding_mode", [
    ((3, 3, 3), (1, 1, 1), 1, 1, "zeros"),   # spans space too
    ((3, 1, 1), (0, 0, 0), 1, 1, "zeros"),   # shortens the clip
    ((2, 1, 1), (1, 0, 0), 1, 1, "zeros"),   # even
    ((3, 1, 1), (1, 0, 0), 2, 1, "zeros"),   # strided
    ((3, 1, 1), (1, 0, 0), 1, 2, "zeros"),   # grouped
    ((3, 1, 1), (1, 0, 0), 1, 1, "replicate"),
    ((3, 1, 1), "same", 1, 1, "zeros"),
])
def test_other_convolutions_stay_as_they_are(kernel, padding, stride, groups, padding_mode):
    conv = torch.nn.Conv3d(4, 4, kernel, padding=padding, stride=stride, groups=groups,
                           padding_mode=padding_mode)
    assert use_frame_conv(torch.nn.Sequential(conv, torch.nn.Conv2d(4, 4, 3))) == 0
    assert type(conv) is torch.nn.Conv3d


def clip(layout: str, batch: int, channels: int, frames: int, height: int = 5, width: int = 7):
    """A [batch, channels, frames, height, width] clip laid out in memory as the UNet's
    spatial layers leave it ((b f) c h w), contiguous, or channels-last."""
    g = torch.Generator().manual_seed(0)
    if layout == "spatial":
        x = torch.randn(batch * frames, channels, height, width, generator=g, dtype=torch.float64)
        return x.reshape(batch, frames, channels, height, width).permute(0, 2, 1, 3, 4)
    if layout == "contiguous":
        return torch.randn(batch, channels, frames, height, width, generator=g, dtype=torch.float64)
    x = torch.randn(batch, frames, height, width, channels, generator=g, dtype=torch.float64)
    return x.permute(0, 4, 1, 2, 3)


@pytest.mark.parametrize("layout", ["spatial", "contiguous", "channels_last"])
@pytest.mark.parametrize("batch,frames,taps,bias", [
    (2, 25, 3, True),   # SVD-XT's guidance batch
    (1, 1, 3, True),    # the decoder at decoding_t 1: the middle tap alone
    (1, 2, 3, True),    # decoding_t 2: padding on both sides of two frames
    (3, 7, 5, False),
    (2, 4, 1, True),
])
def test_it_computes_what_the_conv3d_computes(layout, batch, frames, taps, bias):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(6, 10, (taps, 1, 1), padding=(taps // 2, 0, 0), bias=bias).double()
    x = clip(layout, batch, 6, frames)
    expected = conv(x)
    use_frame_conv(conv)
    got = conv(x)
    assert got.shape == expected.shape == (batch, 10, frames, 5, 7)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_the_windows_are_read_in_place():
    """The batched product reads the padded clip through a strided view: the clip is
    copied once (the padding), never once per window."""
    conv = torch.nn.Conv3d(6, 10, (3, 1, 1), padding=(1, 0, 0)).double()
    use_frame_conv(conv)
    seen = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.Tensor.as_strided:
                seen.append((args[0], out))
            return out

    with Record():
        conv(clip("spatial", 2, 6, 25))
    padded, windows = seen[0]
    assert windows.shape == (2 * 27 - 2, 3 * 6, 35)
    assert windows.untyped_storage().data_ptr() == padded.untyped_storage().data_ptr()
    assert padded.numel() == 2 * 27 * 6 * 35  # the clip and its zero frames, once


@pytest.mark.slow
@torch.no_grad()
def test_blocks_compile_ahead_of_time_with_it(tmp_path):
    """Traced into the compiled blocks (fullgraph), not a reason to fall back to compiling
    in-process; same output as the eager Conv3d within float rounding."""
    unet = build_demo(4)["unet"]
    inputs = unet_inputs(unet)
    expected = unet(*inputs).sample
    assert use_frame_conv(unet) == 16
    # One block holding frame convolutions is enough to show it (each compile costs
    # tens of seconds on the CPU); the rest run eagerly.
    block = next(m for m in unet.modules() if type(m).__name__ == UNET_REGIONS[0])
    assert any(isinstance(m, FrameConv) for m in block.modules())
    saved = SavedRegions([block], tmp_path)
    got = unet(*inputs).sample
    assert dict(saved.counts) == {"compiled": 1}, saved.counts
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_videos_match_the_plain_pipeline():
    """Through the whole pipeline (eager on the CPU), the same video up to float rounding:
    the sums are the same, their order is not."""
    plain = demo_video()
    video = demo_video(Speedups(frame_conv=True))
    assert video.shape == plain.shape
    assert np.abs(video.astype(int) - plain).max() <= 1
    assert psnr(video, plain) > 60
