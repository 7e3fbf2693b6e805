"""The single-token cross-attention shortcut (bentosvd/svd/accel/cross_attention.py): SVD's UNet gives
the same output with it, its cross-attention layers then skip the query projection and
the attention kernel, and any other attention is computed as before."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from bentosvd.protocol import GenerationSettings
from bentosvd.svd.accel.cross_attention import (
    SingleTokenCrossAttention,
    remove_single_token_cross_attention,
    use_single_token_cross_attention,
)
from bentosvd.svd.generator import VideoGenerator
from bentosvd.svd.speedups import Speedups
from bentosvd.weights.random_weights import build_demo


def unet_inputs(unet, frames=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, frames, unet.config.in_channels, size, size, generator=g),
            torch.tensor(10.0),
            torch.randn(2, 1, unet.config.cross_attention_dim, generator=g),
            torch.randn(2, 3, generator=g))


def cross_layers(model):
    return [m for m in model.modules() if isinstance(m, Attention) and m.is_cross_attention]


def test_the_fast_path_and_low_memory_mode_use_it():
    assert Speedups.fast().single_token_cross_attention
    assert Speedups.low_memory_mode().single_token_cross_attention
    assert not Speedups().single_token_cross_attention  # plain diffusers stays plain


def test_every_cross_attention_of_the_full_size_unet_gets_it_and_gives_it_back():
    # SVD's own architecture (weights never materialised): 16 transformer models, each a
    # spatial and a temporal block with one cross-attention layer.
    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel()
    assert use_single_token_cross_attention(unet) == 32
    assert all(isinstance(m.processor, SingleTokenCrossAttention) for m in cross_layers(unet))
    assert use_single_token_cross_attention(unet) == 0  # not wrapped twice
    self_attention = [m for m in unet.modules() if isinstance(m, Attention) and not m.is_cross_attention]
    assert self_attention and not any(isinstance(m.processor, SingleTokenCrossAttention)
                                      for m in self_attention)
    remove_single_token_cross_attention(unet)
    assert all(type(m.processor) is AttnProcessor2_0 for m in cross_layers(unet))


@torch.no_grad()
def test_the_unet_gives_the_same_output_without_the_query_path(monkeypatch):
    unet = build_demo(4)["unet"]
    inputs = unet_inputs(unet)
    expected = unet(*inputs).sample

    layers = cross_layers(unet)
    queried, attended = [], []
    for layer in layers:
        layer.to_q.register_forward_hook(lambda *_: queried.append(1))
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: attended.append(1) or sdpa(*a, **k))
    unet(*inputs)
    full_queries, full_attention = len(queried), len(attended)
    assert full_queries == len(layers) > 0

    use_single_token_cross_attention(unet)
    queried.clear(), attended.clear()
    got = unet(*inputs).sample
    assert queried == []  # no cross-attention query was projected
    assert len(attended) == full_attention - len(layers)  # nor attended
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@torch.no_grad()
def test_more_than_one_token_or_a_mask_is_attended_as_before():
    torch.manual_seed(0)
    layer = Attention(query_dim=64, cross_attention_dim=32, heads=2, dim_head=32).eval()
    shortcut = SingleTokenCrossAttention(AttnProcessor2_0())
    x = torch.randn(3, 10, 64)
    one, many = torch.randn(3, 1, 32), torch.randn(3, 5, 32)
    mask = torch.zeros(3, 1, 5)
    mask[:, :, 3:] = float("-inf")
    for tokens, attention_mask in ((one, None), (many, None), (many, mask)):
        expected = AttnProcessor2_0()(layer, x, tokens, attention_mask)
        got = shortcut(layer, x, tokens, attention_mask)
        assert got.shape == expected.shape == x.shape
        if tokens is one:
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(got, expected)


def test_a_layer_with_its_own_processor_is_left_alone():
    class Custom(AttnProcessor2_0):
        pass

    layer = Attention(query_dim=64, cross_attention_dim=32, heads=2, dim_head=32, processor=Custom())
    norm_cross = Attention(query_dim=64, cross_attention_dim=32, heads=2, dim_head=32,
                           cross_attention_norm="layer_norm")
    assert use_single_token_cross_attention(torch.nn.ModuleList([layer, norm_cross])) == 0
    assert type(layer.processor) is Custom


def demo_video(speedups: Speedups = Speedups()) -> np.ndarray:
    """The demo pipeline's video for one image and seed, eager on the CPU."""
    settings = GenerationSettings(num_frames=4, num_inference_steps=3, min_guidance_scale=1.0,
                                  max_guidance_scale=2.5, fps=7, motion_bucket_id=127,
                                  noise_aug_strength=0.02, decode_chunk_size=2, seed=3)
    image = np.random.default_rng(1).integers(0, 256, (144, 256, 3), dtype=np.uint8)
    return VideoGenerator(build_demo(4), torch.device("cpu"), speedups).generate(image, settings)


def test_videos_match_the_plain_pipeline():
    """Through the whole pipeline (eager on the CPU; the fast path and low-memory mode turn
    it on), the same video byte for byte."""
    assert np.array_equal(demo_video(Speedups(single_token_cross_attention=True)), demo_video())
