"""The UNet's blocks compiled ahead of time and kept on disk (bentosvd.svd.compiled_blocks), on
the CPU with the demo parts.

Inductor compiles C++ kernels here instead of Triton ones, but the files, their keys and
the dispatch are the same code as on a GPU: a block is compiled once per configuration
and input shape, a new process loads the files without tracing anything, other weights
of the same architecture use the same files and get their own output, a damaged file is
compiled again, shapes not warmed run eagerly, and a block that cannot be saved is
compiled in-process instead. GPU timings are the benchmark's (docs/journal.md).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch

from bentosvd.protocol import GenerationSettings
from bentosvd.svd import compiled_blocks
from bentosvd.svd.accel.cross_attention import (
    remove_single_token_cross_attention,
    use_single_token_cross_attention,
)
from bentosvd.svd.compiled_blocks import UNET_REGIONS
from bentosvd.svd.generator import VideoGenerator
from bentosvd.svd.speedups import Speedups
from bentosvd.weights.random_weights import build_demo
from tests.conftest import ROOT
from tests.test_cross_attention import unet_inputs

pytestmark = pytest.mark.slow  # torch.compile on the CPU: tens of seconds a test

SETTINGS = GenerationSettings(num_frames=4, num_inference_steps=3, min_guidance_scale=1.0,
                              max_guidance_scale=2.0, fps=7, motion_bucket_id=127,
                              noise_aug_strength=0.02, decode_chunk_size=1, seed=0)
IMAGE = np.random.default_rng(0).integers(0, 256, (144, 256, 3), dtype=np.uint8)
# The blocks as the service compiles them: channels-last (`channels_last_blocks`, always on
# with compiled blocks; test_layout checks the layouts).
SAVED = Speedups(single_token_cross_attention=True, channels_last_blocks=True, compile_unet=True,
                 compile_regions=True, save_compiled=True, compile_vae=True)
# The same UNet blocks compiled in the process instead of saved, the decoder eager: the
# other compile tests of ONE_PROCESS (tests/conftest.py) use them, so that Inductor's cache
# holds their kernels for the ones that run later (a different configuration would compile
# kernels of its own).
IN_PROCESS = replace(SAVED, save_compiled=False, compile_vae=False)


def files(cache) -> list[str]:
    return sorted(p.name for p in cache.glob("*.bin"))


def assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    """Compiled CPU kernels round differently from eager ones by a unit at most."""
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 2


def warmed(parts: dict, cache, speedups: Speedups = SAVED) -> VideoGenerator:
    gen = VideoGenerator(parts, torch.device("cpu"), speedups, cache)
    gen.warm_up(4, 144, 256)
    gen.compile_new_shapes = False
    return gen


@pytest.fixture(scope="module")
def eager_frames():
    return VideoGenerator(build_demo(4), torch.device("cpu")).generate(IMAGE, SETTINGS)


@pytest.fixture(scope="module")
def cache(saved_blocks, eager_frames):
    """The files of the demo UNet's blocks and VAE decoder for the landscape shape."""
    cache, counts, frames = saved_blocks
    # The demo UNet has 9 blocks (6 residual, 3 transformer); blocks of one configuration
    # and input shape share a file. The decoder has one, for decoding one frame at a time.
    assert counts == {"compiled": len(files(cache))} and 3 <= len(files(cache)) <= 10, counts
    assert sum(name.startswith("TemporalDecoder-") for name in files(cache)) == 1
    assert_close(frames, eager_frames)
    return cache


CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from torch._dynamo.utils import counters
    from bentosvd.weights.random_weights import build_demo
    from bentosvd.svd.generator import VideoGenerator
    from bentosvd.svd.speedups import Speedups
    from tests.test_saved_regions import IMAGE, SAVED, SETTINGS
    gen = VideoGenerator(build_demo(4), torch.device("cpu"), SAVED, sys.argv[1])
    gen.warm_up(4, 144, 256)
    gen.compile_new_shapes = False
    frames = gen.generate(IMAGE, SETTINGS)
    np.save(sys.argv[2], frames)
    print(json.dumps({"counts": dict(gen.saved_regions.counts),
                      "frames_traced": counters["frames"]["total"]}))
""")


def test_a_new_process_loads_every_block_without_tracing(cache, eager_frames, tmp_path):
    out = tmp_path / "frames.npy"
    done = subprocess.run([sys.executable, "-c", CHILD, str(cache), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["counts"] == {"loaded": len(files(cache))}, report
    assert report["frames_traced"] == 0, report  # Dynamo traced nothing: no block, no decoder
    assert_close(np.load(out), eager_frames)


def test_other_weights_use_the_same_files_and_get_their_own_output(cache):
    parts = build_demo(4, seed=1)  # another checkpoint of the same architecture
    expected = VideoGenerator(build_demo(4, seed=1), torch.device("cpu")).generate(IMAGE, SETTINGS)
    before = files(cache)
    gen = warmed(parts, cache)
    assert dict(gen.saved_regions.counts) == {"loaded": len(before)}
    assert files(cache) == before
    assert_close(gen.generate(IMAGE, SETTINGS), expected)


def test_a_damaged_file_is_compiled_again(cache, eager_frames, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bentoml.svd")
    damaged = tmp_path / "saved"
    shutil.copytree(cache, damaged)
    name = files(damaged)[0]
    (damaged / name).write_bytes(b"not a compiled function")
    gen = warmed(build_demo(4), damaged)
    assert dict(gen.saved_regions.counts) == {"loaded": len(files(cache)) - 1, "compiled": 1}
    assert f"could not load {damaged / name}" in caplog.text
    compiled_blocks._load(damaged / name)  # replaced by a file that loads
    assert_close(gen.generate(IMAGE, SETTINGS), eager_frames)


def test_shapes_not_warmed_run_eagerly_and_build_nothing(cache):
    gen = warmed(build_demo(4), cache)
    counts, before = dict(gen.saved_regions.counts), files(cache)
    tall = np.ascontiguousarray(IMAGE.transpose(1, 0, 2))
    expected = VideoGenerator(build_demo(4), torch.device("cpu")).generate(tall, SETTINGS)
    got = gen.generate(tall, SETTINGS)
    assert dict(gen.saved_regions.counts) == counts and files(cache) == before
    np.testing.assert_array_equal(got, expected)  # eager: the same kernels, the same bytes
    # Another decoding_t: the decoder is called with 2 frames at a time, a shape not warmed.
    two = SETTINGS.model_copy(update=dict(decode_chunk_size=2))
    expected = VideoGenerator(build_demo(4), torch.device("cpu")).generate(IMAGE, two)
    got = gen.generate(IMAGE, two)
    assert dict(gen.saved_regions.counts) == counts and files(cache) == before
    assert_close(got, expected)  # the UNet's blocks compiled, the decoder eager


@torch.no_grad()
def test_a_block_that_cannot_be_compiled_ahead_of_time_is_compiled_in_process(
        tmp_path, monkeypatch, caplog):
    """A torch without aot_compile, or a block it cannot capture, costs restart time only
    (one block here: each compile costs tens of seconds on the CPU)."""
    def unsupported(*args):
        raise RuntimeError("no aot_compile here")

    monkeypatch.setattr(compiled_blocks, "_compile", unsupported)
    caplog.set_level(logging.WARNING, logger="bentoml.svd")
    torch._dynamo.reset()
    unet = build_demo(4)["unet"]
    inputs = unet_inputs(unet)
    expected = unet(*inputs).sample
    block = next(m for m in unet.modules() if type(m).__name__ in UNET_REGIONS)
    saved = compiled_blocks.SavedRegions([block], tmp_path)
    got = unet(*inputs).sample
    assert dict(saved.counts) == {"in_process": 1}, saved.counts
    assert files(tmp_path) == []
    assert "compiling it in-process" in caplog.text
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # Compiled, not run eagerly: the block's code went through Inductor.
    assert saved._in_process and all(hasattr(fn, "_torchdynamo_orig_callable")
                                     for fn in saved._in_process.values())


def test_a_file_is_per_block_configuration():
    """Blocks differ in what their compiled code depends on (channels, attention processors):
    each configuration gets keys of its own; the weights' values are not part of it."""
    unet = build_demo(4)["unet"]
    blocks = [m for m in unet.modules() if type(m).__name__ in UNET_REGIONS]
    structures = {compiled_blocks._structure(b) for b in blocks}
    assert 2 <= len(structures) < len(blocks)  # some blocks share one
    other = [m for m in build_demo(4, seed=1)["unet"].modules() if type(m).__name__ in UNET_REGIONS]
    assert [compiled_blocks._structure(b) for b in other] == [compiled_blocks._structure(b) for b in blocks]
    transformer = next(b for b in blocks if type(b).__name__ == "TransformerSpatioTemporalModel")
    before = compiled_blocks._structure(transformer)
    use_single_token_cross_attention(unet)
    assert compiled_blocks._structure(transformer) != before  # the processor's class counts
    remove_single_token_cross_attention(unet)
    assert compiled_blocks._structure(transformer) == before
    # So does the weights' memory layout, which the saved guards check (strides).
    resnet = next(b for b in blocks if type(b).__name__ == "SpatioTemporalResBlock")
    before = compiled_blocks._structure(resnet)
    for weight in resnet.parameters():
        if weight.dim() == 4:
            weight.data = weight.data.contiguous(memory_format=torch.channels_last)
    assert compiled_blocks._structure(resnet) != before


def test_the_fast_path_saves_its_blocks_only_where_it_has_a_cache(tmp_path):
    assert Speedups.fast().save_compiled
    with_cache = VideoGenerator(build_demo(4), torch.device("cpu"), Speedups.fast(), tmp_path)
    assert with_cache.saved_regions is not None
    without = VideoGenerator(build_demo(4), torch.device("cpu"), Speedups.fast())
    assert without.saved_regions is None  # compiled in-process, block by block
    blocks = [m for m in without.pipe.unet.modules() if type(m).__name__ in UNET_REGIONS]
    assert all(m._compiled_call_impl is not None for m in blocks)


def test_a_call_its_guards_reject_runs_eagerly(cache, eager_frames, caplog):
    """The key covers what the saved guards check, so this does not happen in practice;
    should a guard still reject a call, that block runs eagerly, said once in the log."""
    caplog.set_level(logging.WARNING, logger="bentoml.svd")
    gen = warmed(build_demo(4), cache)
    rejecting = 0
    for fn, guarded in gen.saved_regions._functions.values():
        if guarded:
            fn.guard_check = lambda *args, **kwargs: False
            rejecting += 1
    assert rejecting >= 3
    np.testing.assert_array_equal(gen.generate(IMAGE, SETTINGS),
                                  VideoGenerator(build_demo(4), torch.device("cpu")).generate(IMAGE, SETTINGS))
    # Each block called says so: those given NCHW (a block run eagerly hands on NCHW, so
    # the files for channels-last inputs are not called).
    said = caplog.text.count("rejected its inputs")
    assert 3 <= said <= rejecting, caplog.text
    assert_close(gen.generate(IMAGE, SETTINGS), eager_frames)
    assert caplog.text.count("rejected its inputs") == said  # said once per compiled shape


def test_step_caching_runs_on_the_saved_blocks(cache, tmp_path):
    """STEP_CACHE's shallow steps call the outer blocks with the shapes a whole step does:
    the files a whole step's warm-up saved serve both, and the video is step caching's own."""
    settings = SETTINGS.model_copy(update=dict(num_inference_steps=4))
    expected = VideoGenerator(build_demo(4), torch.device("cpu"), Speedups(step_cache=2)).generate(IMAGE, settings)
    copy = tmp_path / "saved"
    shutil.copytree(cache, copy)
    gen = warmed(build_demo(4), copy, replace(SAVED, step_cache=2))
    counts = dict(gen.saved_regions.counts)
    assert counts == {"loaded": len(files(cache))}, counts  # no shape of its own
    assert_close(gen.generate(IMAGE, settings), expected)
    assert dict(gen.saved_regions.counts) == counts  # nothing built in the request


@torch.no_grad()
def test_a_cache_that_cannot_be_written_costs_restart_time_only(tmp_path, caplog):
    """COMPILE_CACHE_DIR on a full or read-only volume: the blocks still compile and run,
    the log says why nothing was kept, and nothing is left half-written (one block here:
    each costs tens of seconds on the CPU, and the save is per block)."""
    caplog.set_level(logging.WARNING, logger="bentoml.svd")
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    unet = build_demo(4)["unet"]
    inputs = unet_inputs(unet)
    expected = unet(*inputs).sample
    block = next(m for m in unet.modules() if type(m).__name__ in UNET_REGIONS)
    saved = compiled_blocks.SavedRegions([block], blocked)
    got = unet(*inputs).sample
    assert dict(saved.counts) == {"compiled": 1}
    assert "could not save the compiled" in caplog.text
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["not-a-folder"]


def test_a_file_whose_code_fails_on_its_first_call_is_compiled_again(cache, eager_frames, tmp_path,
                                                                      monkeypatch, caplog):
    """Kernels built for another driver or GPU set-up can load and then fail when run (the
    GPU is not here to show it): such a file is compiled again, not trusted."""
    caplog.set_level(logging.WARNING, logger="bentoml.svd")
    copy = tmp_path / "saved"
    shutil.copytree(cache, copy)
    load = compiled_blocks._load

    class Broken:
        def __init__(self, loaded):
            self.guard_check = loaded.guard_check  # the file itself is sound

        def __call__(self, *args, **kwargs):
            raise RuntimeError("CUDA error: device kernel image is invalid")

    # One file fails (each compile again costs seconds on the CPU): a residual block's, the
    # cheapest to compile (the decoder's costs several times as much).
    broken = copy / next(name for name in files(copy) if name.startswith("SpatioTemporalResBlock-"))

    def load_broken(path):
        return Broken(load(path)) if path == broken else load(path)

    monkeypatch.setattr(compiled_blocks, "_load", load_broken)
    gen = warmed(build_demo(4), copy)
    assert dict(gen.saved_regions.counts) == {"compiled": 1, "loaded": len(files(cache)) - 1}
    assert caplog.text.count("device kernel image is invalid); compiling it again") == 1
    monkeypatch.setattr(compiled_blocks, "_load", load)
    assert_close(gen.generate(IMAGE, SETTINGS), eager_frames)
    assert dict(warmed(build_demo(4), copy).saved_regions.counts) == {"loaded": len(files(cache))}


@torch.no_grad()
def test_blocks_built_in_another_thread_are_used_from_the_next_call_on(tmp_path):
    """Serving uncompiled (building not allowed), a block records the inputs it found
    nothing compiled for (`wanted`); another thread builds them while calls go on
    uncompiled, and `adopt` puts them to use between two calls; `saved` says whether their
    files exist. One block, NCHW, as test_layout compiles it (each compile costs seconds
    on the CPU); the service's rounds of this over a whole UNet: test_fresh_node."""
    import threading

    unet = build_demo(4)["unet"]
    inputs = unet_inputs(unet)
    block = next(m for m in unet.modules() if type(m).__name__ in UNET_REGIONS)
    regions = compiled_blocks.SavedRegions([block], tmp_path, may_build=lambda: False,
                                           forward_of=lambda b: compiled_blocks.region_forward(b, False))
    eager = unet(*inputs).sample  # uncompiled
    keys = set(regions.wanted)
    assert len(keys) == 1 and not regions.saved(keys)
    builder = threading.Thread(target=regions.build, args=(keys,))
    builder.start()
    assert torch.equal(unet(*inputs).sample, eager)  # meanwhile
    builder.join()
    assert dict(regions.counts) == {"compiled": 1} and regions.saved(keys)
    assert torch.equal(unet(*inputs).sample, eager)  # built, not yet adopted
    assert regions.adopt() == 1 and not regions.wanted
    compiled = unet(*inputs).sample
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert not torch.equal(compiled, eager)  # the compiled kernels round differently
    regions.remove()

    elsewhere = compiled_blocks.SavedRegions([block], tmp_path / "empty", may_build=lambda: False)
    unet(*inputs)
    assert len(elsewhere.wanted) == 1 and not elsewhere.saved(set(elsewhere.wanted))
