"""The fast path (torch.compile of the UNet, the default on CUDA) end to end, on the CPU.

This machine has no GPU, so the compiled kernels here are Inductor's CPU ones; what is
tested is the handling: the warm-up compiles what a request of its shape needs, a warmed
shape runs without compiling again, a shape that was not warmed runs eagerly instead of
compiling inside the request. A served fresh node: test_fresh_node.py. GPU speed is the
benchmark's business (docs/journal.md).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

pytestmark = pytest.mark.slow  # torch.compile on the CPU: tens of seconds a test


def test_compiling_block_by_block_covers_every_block_and_matches_eager():
    """COMPILE_REGIONS: every repeated block is compiled on its own (Inductor's CPU kernels
    here), the warm-up compiles all that a request of that shape needs, and the video
    matches the eager one within fp32 rounding."""
    import numpy as np
    import torch
    from torch._dynamo.utils import counters

    from bentosvd.protocol import GenerationSettings
    from bentosvd.svd.compiled_blocks import UNET_REGIONS
    from bentosvd.svd.generator import VideoGenerator
    from bentosvd.weights.random_weights import build_demo
    from tests.test_saved_regions import IN_PROCESS

    settings = GenerationSettings(num_frames=4, num_inference_steps=3, min_guidance_scale=1.0,
                                  max_guidance_scale=2.0, fps=7, motion_bucket_id=127,
                                  noise_aug_strength=0.02, decode_chunk_size=2, seed=0)
    image = np.random.default_rng(0).integers(0, 256, (144, 256, 3), dtype=np.uint8)
    torch._dynamo.reset()
    gen = VideoGenerator(build_demo(4), torch.device("cpu"), IN_PROCESS)
    unet = gen.pipe.unet
    blocks = [m for m in unet.modules() if type(m).__name__ in UNET_REGIONS]
    assert len(blocks) >= 6 and all(m._compiled_call_impl is not None for m in blocks)
    assert unet._compiled_call_impl is None  # not also compiled as one graph
    gen.warm_up(4, 144, 256)
    gen.compile_new_shapes = False
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2
    got = gen.generate(image, settings)
    assert counters["stats"]["unique_graphs"] == graphs  # the request compiled nothing
    expected = VideoGenerator(build_demo(4), torch.device("cpu")).generate(image, settings)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 2


def test_the_decoder_runs_compiled_only_for_the_warmed_decoding_t(monkeypatch):
    """COMPILE_VAE: the warm-up compiles the VAE's decoder for one frame at a time (the
    default decoding_t), decoding a single frame; a request with that decoding_t runs it
    compiled, one with another decoding_t eagerly, neither compiles anything, and both
    match the eager video."""

    import numpy as np
    import torch
    from diffusers.models.autoencoders.autoencoder_kl_temporal_decoder import (
        TemporalDecoder,
    )
    from torch._dynamo.utils import counters

    from bentosvd.protocol import GenerationSettings
    from bentosvd.svd.generator import VideoGenerator
    from bentosvd.weights.random_weights import build_demo
    from tests.test_saved_regions import SAVED

    # The decoder's Python forward runs only eagerly: compiled code was traced from it once.
    eager_calls = []
    forward = TemporalDecoder.forward

    def counted(self, *args, **kwargs):
        if not torch.compiler.is_compiling():
            eager_calls.append(args[0].shape[0])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(TemporalDecoder, "forward", counted)
    image = np.random.default_rng(0).integers(0, 256, (144, 256, 3), dtype=np.uint8)
    torch._dynamo.reset()
    # test_saved_regions' decoder, compiled in the process, with the UNet left eager: the
    # UNet's compiled blocks are the other tests' (each compile costs seconds on the CPU),
    # nothing here depends on them, and the decoder's kernels are then in Inductor's cache.
    gen = VideoGenerator(build_demo(4), torch.device("cpu"),
                         replace(SAVED, compile_unet=False, compile_regions=False, save_compiled=False))
    assert gen.pipe.vae.decoder._compiled_call_impl is not None and gen.saved_regions is None
    assert not any(m._compiled_call_impl is not None for m in gen.pipe.unet.modules())
    eager = VideoGenerator(build_demo(4), torch.device("cpu"))
    decoded = []  # frames per decode_latents call
    decode_latents = gen.pipe.decode_latents
    gen.pipe.decode_latents = lambda latents, *a: decoded.append(latents.shape[1]) or decode_latents(latents, *a)
    gen.warm_up(4, 144, 256)
    gen.compile_new_shapes = False
    assert decoded == [1]  # the warm-up decodes one frame, as each call at decoding_t 1 does
    assert ("vae", 1, 144, 256) in gen.compiled_shapes
    graphs = counters["stats"]["unique_graphs"]
    for decoding_t, eager_decodes in ((1, []), (3, [3, 1])):
        settings = GenerationSettings(
            num_frames=4, num_inference_steps=2, min_guidance_scale=1.0, max_guidance_scale=2.0,
            fps=7, motion_bucket_id=127, noise_aug_strength=0.02, decode_chunk_size=decoding_t,
            seed=0)
        eager_calls.clear()
        got = gen.generate(image, settings)
        assert eager_calls == eager_decodes, decoding_t
        assert np.abs(got.astype(int) - eager.generate(image, settings).astype(int)).max() <= 2
    assert counters["stats"]["unique_graphs"] == graphs  # no request compiled anything
