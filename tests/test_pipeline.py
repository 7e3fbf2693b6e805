"""bentosvd.svd.generator on the CPU with the demo parts: phase timings, progress, the FP8 guard."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from bentosvd.protocol import GenerationSettings
from bentosvd.svd.accel.fp8 import quantize_fp8
from bentosvd.svd.generator import VideoGenerator, split_guidance_batch
from bentosvd.svd.speedups import Speedups
from bentosvd.weights.random_weights import build_demo

SETTINGS = GenerationSettings(num_frames=4, num_inference_steps=3, min_guidance_scale=1.0,
                              max_guidance_scale=2.0, fps=7, motion_bucket_id=127,
                              noise_aug_strength=0.02, decode_chunk_size=2, seed=0)


@pytest.fixture(scope="module")
def generator() -> VideoGenerator:
    return VideoGenerator(build_demo(4), torch.device("cpu"))


def test_generate_reports_each_step_and_the_time_of_each_phase(generator):
    steps, timings = [], {}
    image = np.full((144, 256, 3), 128, np.uint8)
    started = time.perf_counter()
    frames = generator.generate(image, SETTINGS, on_step=lambda i, n: steps.append((i, n)),
                                timings=timings)
    elapsed = time.perf_counter() - started
    assert frames.shape == (4, 144, 256, 3) and frames.dtype == np.uint8
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert set(timings) == {"image_encode", "denoise", "vae_decode"}
    assert all(t > 0 for t in timings.values())
    assert sum(timings.values()) <= elapsed  # the phases are parts of the call


@pytest.mark.parametrize(("chunk", "sizes"), [(1, [1, 1, 1, 1]), (3, [3, 1]), (4, [4]), (8, [4])])
def test_decoded_frames_are_handed_on_chunk_by_chunk(generator, chunk, sizes):
    """Each decoder call's frames reach on_frames as they are decoded (the server encodes
    them meanwhile): in order, decode_chunk_size at a time, the same frames as returned."""
    decoded, handed = [], []
    decode = generator.pipe.decode_latents
    generator.pipe.decode_latents = lambda *a: decoded.append(len(handed)) or decode(*a)
    try:
        frames = generator.generate(np.full((144, 256, 3), 128, np.uint8),
                                    SETTINGS.model_copy(update=dict(decode_chunk_size=chunk)),
                                    on_frames=handed.append)
    finally:
        generator.pipe.decode_latents = decode
    assert [len(c) for c in handed] == sizes
    assert decoded == list(range(len(sizes)))  # chunk i handed on before call i + 1 began
    assert all(c.dtype == np.uint8 and c.shape[1:] == (144, 256, 3) for c in handed)
    np.testing.assert_array_equal(np.concatenate(handed), frames)


def test_decode_on_its_own_adds_its_time_to_the_decode_phase():
    """`decode` runs before any `generate` too (the overlap probe calls it so) and counts
    its whole time, the frames' way to the host included, as vae_decode."""
    gen = VideoGenerator(build_demo(4), torch.device("cpu"))
    latents = torch.randn(1, 4, 4, 18, 32, generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    frames = gen.decode(latents, 3)
    assert frames.shape == (4, 144, 256, 3) and frames.dtype == np.uint8
    assert 0 < gen.phases.times["vae_decode"] <= time.perf_counter() - started
    assert gen.phases.times["image_encode"] == 0


def test_warm_up_runs_one_step_and_skips_the_uncompiled_decoder(generator):
    calls = []
    unet_forward = generator.pipe.unet.forward
    generator.pipe.unet.forward = lambda *a, **k: calls.append(a[0].shape) or unet_forward(*a, **k)
    try:
        generator.warm_up(4, 144, 256)
    finally:
        del generator.pipe.unet.forward
    # One step with guidance: the conditional and unconditional halves in one batch.
    assert calls == [(2, 4, 8, 18, 32)]
    assert generator.phases.times["vae_decode"] == 0


def test_an_exception_from_on_step_stops_the_generation(generator):
    class Stop(Exception):
        pass

    def stop_at_2(i, n):
        if i == 2:
            raise Stop

    with pytest.raises(Stop):
        generator.generate(np.zeros((144, 256, 3), np.uint8), SETTINGS, on_step=stop_at_2)


def test_fp8_is_refused_where_it_cannot_run():
    unet = build_demo(4)["unet"]
    with pytest.raises(ValueError, match="compute capability 8.9"):
        quantize_fp8(unet, torch.device("cpu"))
    with pytest.raises(ValueError, match="compute capability 8.9"):
        VideoGenerator(build_demo(4), torch.device("cpu"), Speedups(fp8=True))


def test_split_guidance_batch_gives_the_batched_result(generator):
    unet = generator.pipe.unet
    torch.manual_seed(0)
    config = unet.config
    sample = torch.randn(2, 3, config.in_channels, 8, 8)
    hidden = torch.randn(2, 1, config.cross_attention_dim)
    time_ids = torch.randn(2, 3)
    whole = unet(sample, torch.tensor(5.0), hidden, time_ids, return_dict=False)[0]
    split_guidance_batch(unet)
    try:
        halves = unet(sample, torch.tensor(5.0), hidden, time_ids, return_dict=False)[0]
        as_output = unet(sample, torch.tensor(5.0), hidden, time_ids).sample
    finally:
        del unet.forward  # back to the class's forward for the other tests
    torch.testing.assert_close(halves, whole, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(as_output, whole, rtol=1e-4, atol=1e-5)
