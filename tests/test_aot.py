"""The ahead-of-time compiled UNet (bentosvd.aot) on the CPU with the demo parts.

AOTInductor compiles C++ kernels here instead of Triton ones, but the package cache is the
same code: a package is compiled once per shape, a new process loads it instead of
compiling, weights of another checkpoint get a package of their own, a damaged package is
compiled again, and the compiled UNet computes what the eager one does. CUDA graphs need
a GPU: the benchmark runs them (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from bentosvd.components import build_demo
from bentosvd.pipeline import GenerationSettings, Speedups, VideoGenerator
from bentosvd.bench import PSNR_TOLERANCE_DB, psnr

SETTINGS = GenerationSettings(num_frames=4, num_inference_steps=3, min_guidance_scale=1.0,
                              max_guidance_scale=2.0, fps=7, motion_bucket_id=127,
                              noise_aug_strength=0.02, decode_chunk_size=2, seed=0)
IMAGE = np.random.default_rng(0).integers(0, 256, (144, 256, 3), dtype=np.uint8)
AOT = Speedups(aot_unet=True)


def packages(cache) -> list[str]:
    return sorted(p.name for p in cache.glob("unet-*.pt2"))


@pytest.fixture(scope="module")
def eager_frames():
    return VideoGenerator(build_demo(4), torch.device("cpu")).generate(IMAGE, SETTINGS)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, eager_frames):
    """A cache holding the package of the demo UNet's landscape shape."""
    cache = tmp_path_factory.mktemp("aot")
    frames = VideoGenerator(build_demo(4), torch.device("cpu"), AOT, cache).generate(IMAGE, SETTINGS)
    assert len(packages(cache)) == 1
    assert psnr(frames, eager_frames) >= PSNR_TOLERANCE_DB, psnr(frames, eager_frames)
    return cache


def test_a_new_generator_loads_the_package_instead_of_compiling(cache, eager_frames, caplog):
    caplog.set_level(logging.INFO, logger="bentoml.svd")
    gen = VideoGenerator(build_demo(4), torch.device("cpu"), AOT, cache)
    gen.warm_up(4, 144, 256)
    assert "loaded the compiled UNet" in caplog.text
    assert "compiling" not in caplog.text
    gen.compile_new_shapes = False
    frames = gen.generate(IMAGE, SETTINGS)
    assert psnr(frames, eager_frames) >= PSNR_TOLERANCE_DB
    # A shape that was not warmed up runs eagerly: nothing new is compiled.
    tall = gen.generate(np.ascontiguousarray(IMAGE.transpose(1, 0, 2)), SETTINGS)
    assert tall.shape == (4, 256, 144, 3)
    assert len(packages(cache)) == 1


def test_other_weights_get_a_package_of_their_own(cache, caplog):
    caplog.set_level(logging.INFO, logger="bentoml.svd")
    parts = build_demo(4)
    with torch.no_grad():
        parts["unet"].conv_out.bias.add_(0.5)  # a different checkpoint of the same architecture
    before = packages(cache)
    VideoGenerator(parts, torch.device("cpu"), AOT, cache).warm_up(4, 144, 256)
    assert "compiled the UNet ahead of time" in caplog.text
    assert len(packages(cache)) == 2 and set(before) < set(packages(cache))


def test_a_damaged_package_is_compiled_again(tmp_path, cache, eager_frames, caplog):
    caplog.set_level(logging.INFO, logger="bentoml.svd")
    damaged = tmp_path / "aot"
    damaged.mkdir()
    gen = VideoGenerator(build_demo(4), torch.device("cpu"), AOT, cache)
    name = next(p for p in packages(cache) if gen.aot._load(cache / p) is not None)
    (damaged / name).write_bytes(b"not a package")
    (damaged / name).with_suffix(".json").write_text((cache / name).with_suffix(".json").read_text())
    frames = VideoGenerator(build_demo(4), torch.device("cpu"), AOT, damaged).generate(IMAGE, SETTINGS)
    assert "not using the compiled UNet" in caplog.text
    assert "compiled the UNet ahead of time" in caplog.text
    assert psnr(frames, eager_frames) >= PSNR_TOLERANCE_DB
    assert (damaged / name).stat().st_size > 1000


def test_aot_refuses_the_modes_it_cannot_run_with():
    for clash in ("compile_unet", "fp8", "low_memory"):
        with pytest.raises(ValueError, match=clash):
            Speedups(aot_unet=True, **{clash: True})
