"""bentosvd.pipeline on the CPU with the demo parts: phase timings, progress, the FP8 guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bentosvd.components import build_demo
from bentosvd.pipeline import GenerationSettings, Speedups, VideoGenerator, quantize_fp8

SETTINGS = GenerationSettings(num_frames=4, num_inference_steps=3, min_guidance_scale=1.0,
                              max_guidance_scale=2.0, fps=7, motion_bucket_id=127,
                              noise_aug_strength=0.02, decode_chunk_size=2, seed=0)


@pytest.fixture(scope="module")
def generator() -> VideoGenerator:
    return VideoGenerator(build_demo(4), torch.device("cpu"))


def test_generate_reports_each_step_and_the_time_of_each_phase(generator):
    steps, timings = [], {}
    image = np.full((144, 256, 3), 128, np.uint8)
    frames = generator.generate(image, SETTINGS, on_step=lambda i, n: steps.append((i, n)),
                                timings=timings)
    assert frames.shape == (4, 144, 256, 3) and frames.dtype == np.uint8
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert set(timings) == {"image_encode", "denoise", "vae_decode"}
    assert all(t > 0 for t in timings.values())


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
