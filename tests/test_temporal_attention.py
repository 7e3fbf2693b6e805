"""The temporal self-attention's kernel preference (bentosvd/svd/accel/temporal_attention.py): every
temporal self-attention layer of SVD's UNet gets it and nothing else does, SDPA then tries
the memory-efficient kernel first, it survives compiling ahead of time, and where that
kernel cannot run (this CPU) the output is what it was. Its speed is measured on a GPU
(docs/journal.md, run z): this machine has none of the kernels it chooses between."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.models.attention import TemporalBasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch.nn.attention import SDPBackend

from bentosvd.svd.accel.temporal_attention import (
    TemporalAttention,
    remove_efficient_temporal_attention,
    use_efficient_temporal_attention,
)
from bentosvd.svd.compiled_blocks import UNET_REGIONS, SavedRegions
from bentosvd.svd.speedups import Speedups
from bentosvd.weights.random_weights import build_demo
from tests.test_cross_attention import demo_video, unet_inputs


def temporal_self_attention(model) -> list[Attention]:
    return [m.attn1 for m in model.modules() if isinstance(m, TemporalBasicTransformerBlock)]


def test_the_fast_path_and_low_memory_mode_use_it():
    assert Speedups.fast().efficient_temporal_attention
    assert Speedups.low_memory_mode().efficient_temporal_attention
    assert not Speedups().efficient_temporal_attention  # plain diffusers stays plain


def test_every_temporal_self_attention_of_the_full_size_unet_gets_it_and_gives_it_back():
    # SVD's own architecture (weights never materialised): 16 transformer models, each with
    # one temporal block.
    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel()
    assert use_efficient_temporal_attention(unet) == 16
    assert all(isinstance(m.processor, TemporalAttention) for m in temporal_self_attention(unet))
    assert use_efficient_temporal_attention(unet) == 0  # not wrapped twice
    others = [m for m in unet.modules() if isinstance(m, Attention)
              and not any(m is t for t in temporal_self_attention(unet))]
    assert len(others) == 48 and not any(isinstance(m.processor, TemporalAttention) for m in others)
    remove_efficient_temporal_attention(unet)
    assert all(type(m.processor) is AttnProcessor2_0 for m in temporal_self_attention(unet))


@torch.no_grad()
def test_the_layers_run_with_the_memory_efficient_kernel_first():
    unet = build_demo(4)["unet"]
    use_efficient_temporal_attention(unet)
    orders = []
    for attn in temporal_self_attention(unet):
        own = attn.processor.fallback

        def recording(*args, own=own, **kwargs):
            orders.append((torch._C._get_sdp_priority_order(), torch.backends.cuda.cudnn_sdp_enabled()))
            return own(*args, **kwargs)
        attn.processor.fallback = recording
    before = torch._C._get_sdp_priority_order()
    unet(*unet_inputs(unet))
    assert orders and all(order[0] == SDPBackend.EFFICIENT_ATTENTION.value and cudnn for order, cudnn in orders)
    assert torch._C._get_sdp_priority_order() == before  # only inside those layers


@torch.no_grad()
def test_where_that_kernel_cannot_run_the_output_is_unchanged():
    unet = build_demo(4)["unet"]
    inputs = unet_inputs(unet)
    expected = unet(*inputs).sample
    use_efficient_temporal_attention(unet)
    assert torch.equal(unet(*inputs).sample, expected)


@pytest.mark.slow
@torch.no_grad()
def test_blocks_compile_ahead_of_time_with_it(tmp_path):
    """The preference is traced into the compiled block (fullgraph), not a reason to fall
    back to compiling in-process."""
    unet = build_demo(4)["unet"]
    inputs = unet_inputs(unet)
    expected = unet(*inputs).sample
    use_efficient_temporal_attention(unet)
    # One block is enough to show it (each compile costs tens of seconds on the CPU).
    block = next(m for m in unet.modules() if type(m).__name__ == UNET_REGIONS[1])
    saved = SavedRegions([block], tmp_path)
    got = unet(*inputs).sample
    assert dict(saved.counts) == {"compiled": 1}, saved.counts
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_videos_match_the_plain_pipeline_here():
    assert np.array_equal(demo_video(Speedups(efficient_temporal_attention=True)), demo_video())
