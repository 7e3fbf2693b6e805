"""Channels-last activations between the UNet's compiled blocks (bentosvd/svd/accel/channels_last.py), on
the CPU with the demo parts: every compiled block then returns channels-last, ahead of
time or in the process, and all but the two fed by conv_in get it; a restart loads its
own files (not the NCHW blocks'); a shape not warmed up runs eagerly in NCHW; and the
video is the same within rounding. Its speed is measured on a GPU (docs/journal.md,
2026-11-28 runs q, u and v)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_temporal import (
    TransformerTemporalModelOutput,
)

from bentosvd.svd.accel.channels_last import channels_last_output
from bentosvd.svd.compiled_blocks import UNET_REGIONS, SavedRegions, compile_regions, region_forward
from bentosvd.svd.generator import VideoGenerator
from bentosvd.svd.speedups import Speedups
from bentosvd.weights.random_weights import build_demo
from tests.test_cross_attention import unet_inputs
from tests.test_saved_regions import IMAGE, SAVED, SETTINGS, assert_close, warmed

pytestmark = pytest.mark.slow  # torch.compile on the CPU: tens of seconds a test

CHANNELS_LAST = SAVED  # as the service compiles its blocks


def test_the_fast_path_uses_it():
    assert Speedups.fast().channels_last_blocks
    assert not Speedups.low_memory_mode().channels_last_blocks
    assert not Speedups().channels_last_blocks


def is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def test_the_output_is_made_channels_last_in_compiled_code_and_nothing_else_changes():
    x = torch.randn(2, 3, 4, 5)

    def forward(self, kind):
        return {"tensor": x, "tuple": (x, 7),
                "object": TransformerTemporalModelOutput(sample=x),
                "rank 5": x[None]}[kind]

    wrapped = channels_last_output(forward)
    assert wrapped is channels_last_output(forward)  # one per class: compiled code is shared
    compiled = torch.compile(wrapped, backend="eager", fullgraph=True)
    out = compiled(None, "tensor")
    assert is_channels_last(out) and torch.equal(out, x)
    first, rest = compiled(None, "tuple")
    assert is_channels_last(first) and torch.equal(first, x) and rest == 7
    assert is_channels_last(compiled(None, "object").sample)
    assert compiled(None, "rank 5").is_contiguous()  # only images have a channels-last
    # Run eagerly (a shape the warm-up did not compile), the block's output is its own.
    assert wrapped(None, "tensor") is x
    assert wrapped(None, "tuple")[0] is x


def record_layouts(unet) -> list[tuple[bool, bool]]:
    """(input, output) channels-last for every block call from now on."""
    seen = []

    def hook(module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        seen.append((is_channels_last(x), is_channels_last(out[0] if isinstance(out, tuple) else out)))
    for m in unet.modules():
        if type(m).__name__ in UNET_REGIONS:
            m.register_forward_hook(hook, with_kwargs=True)
    return seen


@pytest.fixture(scope="module")
def eager_frames():
    return VideoGenerator(build_demo(4), torch.device("cpu")).generate(IMAGE, SETTINGS)


@pytest.fixture(scope="module")
def channels_last_cache(saved_blocks):
    """The channels-last blocks compiled once (test_saved_regions' too): (folder, files)."""
    cache, counts, _ = saved_blocks
    assert set(counts) == {"compiled"}, counts
    return cache, set(cache.glob("*.bin"))


def copy_of(cache, tmp_path):
    """The module's compiled blocks in a folder of the test's own, which it may add to."""
    return Path(shutil.copytree(cache[0], tmp_path / "cache"))


def test_saved_blocks_get_and_return_channels_last_and_a_restart_loads_them(
        channels_last_cache, tmp_path, eager_frames):
    # The fixture compiled them (a first start); this is a restart on the same files.
    gen = warmed(build_demo(4), copy_of(channels_last_cache, tmp_path), CHANNELS_LAST)
    assert set(gen.saved_regions.counts) == {"loaded"}, gen.saved_regions.counts
    seen = record_layouts(gen.pipe.unet)
    frames = gen.generate(IMAGE, SETTINGS)
    blocks = [m for m in gen.pipe.unet.modules() if type(m).__name__ in UNET_REGIONS]
    # each block called once per step (the guidance batch is one call)
    assert len(seen) == len(blocks) * SETTINGS.num_inference_steps, seen
    assert all(returned for _, returned in seen), seen
    # The convolution weights stay NCHW: conv_in's output is NCHW, and so is what the two
    # blocks it feeds get (the first one, and the last up block's through the skip
    # connection); every other block gets channels-last from the one before it.
    given_nchw = [i % len(blocks) for i, (given, _) in enumerate(seen) if not given]
    assert given_nchw == [0, len(blocks) - 2] * SETTINGS.num_inference_steps, seen
    assert_close(frames, eager_frames)


@torch.no_grad()
def test_the_nchw_blocks_files_are_not_taken_for_them(tmp_path):
    """A block's file holds the layout of its output: a block compiled channels-last and
    the same block compiled NCHW, with the same inputs, get a file each, and each loads
    its own (one block: each compile costs tens of seconds on the CPU)."""
    unet = build_demo(4)["unet"]
    inputs = unet_inputs(unet)

    def saved(channels_last: bool) -> SavedRegions:
        block = next(m for m in unet.modules() if type(m).__name__ in UNET_REGIONS)
        regions = SavedRegions([block], tmp_path, forward_of=lambda b: region_forward(b, channels_last))
        unet(*inputs)
        regions.remove()
        return regions

    assert dict(saved(True).counts) == {"compiled": 1}
    assert dict(saved(False).counts) == {"compiled": 1}  # not the channels-last file
    assert len(list(tmp_path.glob("*.bin"))) == 2
    assert dict(saved(True).counts) == {"loaded": 1}
    assert dict(saved(False).counts) == {"loaded": 1}


def test_a_shape_not_warmed_up_runs_eagerly_in_nchw(channels_last_cache, tmp_path):
    """The fallback for a shape the warm-up left out runs the blocks eagerly; there the
    layout stays NCHW, as eager runs fastest (channels-last eager blocks made a step 12%
    slower: docs/journal.md, H200 run t)."""
    gen = warmed(build_demo(4), copy_of(channels_last_cache, tmp_path), CHANNELS_LAST)
    built = dict(gen.saved_regions.counts)
    seen = record_layouts(gen.pipe.unet)
    portrait = np.ascontiguousarray(IMAGE.transpose(1, 0, 2))
    frames = gen.generate(portrait, SETTINGS)
    assert dict(gen.saved_regions.counts) == built  # nothing compiled for it
    assert seen and not any(given or returned for given, returned in seen), seen
    eager = VideoGenerator(build_demo(4), torch.device("cpu")).generate(portrait, SETTINGS)
    assert_close(frames, eager)


@torch.no_grad()
def test_blocks_compiled_in_process_return_channels_last_too():
    """compile_regions on the first down block, which holds a block of each class (each
    compile costs seconds on the CPU; the rest of the UNet runs eagerly): both compiled
    blocks return channels-last (run eagerly, a block's output is NCHW: see above)."""
    unet = build_demo(4)["unet"]
    inputs = (torch.randn(1, 4, 8, 8, 8), torch.tensor(10.0), torch.randn(1, 1, 32), torch.randn(1, 3))
    unet(*inputs)
    torch._dynamo.reset()
    first = unet.down_blocks[0]
    assert sorted(type(m).__name__ for m in first.modules() if type(m).__name__ in UNET_REGIONS) \
        == sorted(UNET_REGIONS)
    compile_regions(first, UNET_REGIONS, channels_last=True)
    seen = record_layouts(first)
    unet(*inputs)
    assert len(seen) == 2 and all(out for _, out in seen), seen


def test_step_caching_keeps_to_the_warmed_blocks(channels_last_cache, tmp_path):
    """STEP_CACHE's shallow steps hand the kept (channels-last) feature to the outer blocks
    with the strides a whole step hands them: the request runs on what the warm-up built,
    nothing more (new shapes stay allowed here, so a miss would show as a compile)."""
    settings = SETTINGS.model_copy(update=dict(num_inference_steps=4))
    speedups = replace(CHANNELS_LAST, step_cache=2)
    expected = VideoGenerator(build_demo(4), torch.device("cpu"), Speedups(step_cache=2)).generate(IMAGE, settings)
    gen = VideoGenerator(build_demo(4), torch.device("cpu"), speedups,
                         copy_of(channels_last_cache, tmp_path))
    gen.warm_up(4, 144, 256)
    counts = dict(gen.saved_regions.counts)
    assert_close(gen.generate(IMAGE, settings), expected)
    assert dict(gen.saved_regions.counts) == counts
