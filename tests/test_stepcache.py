"""Step caching (bentosvd/svd/stepcache.py) on the CPU with the demo parts.

The split of the UNet into a whole and a shallow pass is checked against diffusers' own
forward; a generation is checked to run the whole UNet only every N-th step, to change
the video (it is opt-in for that reason) and to drop what it kept when it ends. How much
it changes a full-size video and how much faster it is: the benchmark (GPU).
"""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import pydantic
import pytest
import torch

from bentosvd.config import Settings
from bentosvd.protocol import GenerationSettings
from bentosvd.svd.generator import VideoGenerator
from bentosvd.svd.speedups import Speedups
from bentosvd.svd.stepcache import StepCache
from bentosvd.weights.random_weights import build_demo
from tests.test_saved_regions import IN_PROCESS
from tests.test_service import DEMO, assert_video, post

SETTINGS = GenerationSettings(num_frames=4, num_inference_steps=7, min_guidance_scale=1.0,
                              max_guidance_scale=2.0, fps=7, motion_bucket_id=127,
                              noise_aug_strength=0.02, decode_chunk_size=2, seed=0)
IMAGE = np.random.default_rng(0).integers(0, 256, (144, 256, 3), dtype=np.uint8)


def unet_inputs(frames=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, frames, 8, 18, 32, generator=g), torch.tensor(5.0),
            torch.randn(2, 1, 32, generator=g), torch.randn(2, 3, generator=g))


def test_the_whole_pass_is_diffusers_forward_and_the_shallow_pass_completes_it():
    unet = build_demo(4)["unet"]
    inputs = unet_inputs()
    with torch.no_grad():
        expected = unet(*inputs).sample
        cache = StepCache(unet, 2)
        whole, deep = cache._full(*inputs)
        # On the feature its own whole pass kept, the shallow pass gives the same output:
        # it computes exactly the part of the UNet the whole pass does not keep.
        shallow = cache._shallow(*inputs, deep)
        other = cache._shallow(*unet_inputs(seed=1)[:1], *inputs[1:], deep)
    torch.testing.assert_close(whole, expected, rtol=0, atol=0)
    torch.testing.assert_close(shallow, whole, rtol=0, atol=0)
    assert not torch.allclose(other, whole)  # the shallow pass does use its own input


def test_with_fewer_layers_the_shallow_pass_runs_only_the_outer_layers():
    """STEP_CACHE_LAYERS=1: the kept feature enters the last up block's last layer, and a
    shallow step runs conv_in, that layer and conv_out: no layer of the first down block,
    one of the last up block. On its own whole pass's feature it still gives that pass's
    output."""
    unet = build_demo(4)["unet"]
    inputs = unet_inputs()
    ran = []
    down, up = unet.down_blocks[0], unet.up_blocks[-1]
    for name, module in [("down", down.resnets[0]), *[(f"up{i}", r) for i, r in enumerate(up.resnets)]]:
        module.register_forward_hook(lambda m, a, out, name=name: ran.append(name))
    with torch.no_grad():
        expected = unet(*inputs).sample
        cache = StepCache(unet, 2, layers=1)
        ran.clear()
        whole, deep = cache._full(*inputs)
        assert ran == ["down", "up0", "up1"]
        ran.clear()
        shallow = cache._shallow(*inputs, deep)
        assert ran == ["up1"]
        default = StepCache(build_demo(4)["unet"], 2)
    assert default.layers == len(up.resnets) == 2  # 0: all of them
    torch.testing.assert_close(whole, expected, rtol=0, atol=0)
    torch.testing.assert_close(shallow, whole, rtol=0, atol=0)
    # Kept: the output of the last up block's first layer, not the input of the block.
    assert deep.shape[1] == unet.config.block_out_channels[0] != unet.config.block_out_channels[1]


def test_fewer_layers_change_the_video_more():
    """Each setting is its own approximation of the exact video; on the demo's random
    weights the shallower one lands further from it."""
    exact = VideoGenerator(build_demo(4), torch.device("cpu")).generate(IMAGE, SETTINGS)

    def distance(layers):
        gen = VideoGenerator(build_demo(4), torch.device("cpu"),
                             Speedups(step_cache=2, step_cache_layers=layers))
        return np.abs(gen.generate(IMAGE, SETTINGS).astype(int) - exact).mean()

    assert 0 < distance(2) < distance(1)


@pytest.mark.parametrize("interval", [2, 3])
def test_a_generation_runs_the_whole_unet_every_nth_step(interval):
    gen = VideoGenerator(build_demo(4), torch.device("cpu"), Speedups(step_cache=interval))
    passes = []
    full, shallow = gen.step_cache.full, gen.step_cache.shallow
    gen.step_cache.full = lambda *a: passes.append("whole") or full(*a)
    gen.step_cache.shallow = lambda *a: passes.append("shallow") or shallow(*a)
    frames = gen.generate(IMAGE, SETTINGS)
    assert passes == ["whole" if i % interval == 0 else "shallow" for i in range(7)]
    assert frames.shape == (4, 144, 256, 3) and frames.dtype == np.uint8
    assert gen.step_cache.deep is None  # the kept feature is dropped with the generation
    # A second generation starts over with a whole pass.
    passes.clear()
    gen.generate(IMAGE, SETTINGS)
    assert passes[0] == "whole"


def test_step_caching_changes_the_video_and_is_deterministic():
    exact = VideoGenerator(build_demo(4), torch.device("cpu")).generate(IMAGE, SETTINGS)
    cached = VideoGenerator(build_demo(4), torch.device("cpu"), Speedups(step_cache=3))
    first, second = cached.generate(IMAGE, SETTINGS), cached.generate(IMAGE, SETTINGS)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, exact)


def test_a_stopped_generation_drops_the_kept_feature():
    gen = VideoGenerator(build_demo(4), torch.device("cpu"), Speedups(step_cache=2))

    def stop(step, total):
        if step == 2:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        gen.generate(IMAGE, SETTINGS, on_step=stop)
    assert gen.step_cache.deep is None


@pytest.mark.slow
@pytest.mark.parametrize("regions", [True, False], ids=["block_by_block", "whole_passes"])
def test_the_compiled_passes_match_the_eager_ones(regions, monkeypatch):
    """With the fast path the blocks are compiled (the default), or else each pass as one
    graph; the warm-up compiles what both passes need, and a request of the warmed shape
    compiles nothing more.

    Block by block, Inductor compiles the blocks (its CPU kernels here). The whole passes'
    graphs hold the same operations, and what is theirs to check is which graphs the
    warm-up builds: Dynamo traces and guards them as for Inductor, and AOTAutograd
    functionalises them (`aot_eager`), but Inductor does not compile them again as two
    large graphs (a minute of CPU)."""
    torch._dynamo.reset()
    eager = VideoGenerator(build_demo(4), torch.device("cpu"), Speedups(step_cache=2))
    if regions:
        # As test_saved_regions compiles them: the deep steps' kernels are theirs.
        speedups = replace(IN_PROCESS, step_cache=2)
    else:
        speedups = Speedups(compile_unet=True, compile_regions=False, step_cache=2)
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = VideoGenerator(build_demo(4), torch.device("cpu"), speedups)
    compiled.warm_up(4, 144, 256)
    compiled.compile_new_shapes = False
    from torch._dynamo.utils import counters
    frames_before = counters["stats"]["unique_graphs"]
    got = compiled.generate(IMAGE, SETTINGS)
    assert counters["stats"]["unique_graphs"] == frames_before  # nothing compiled in the request
    expected = eager.generate(IMAGE, SETTINGS)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 2


@pytest.mark.parametrize("speedups, message", [
    (dict(step_cache=1), "step_cache is 1: use 0"),
    (dict(step_cache_layers=1), "set step_cache"),
])
def test_settings_that_cannot_work_are_refused(speedups, message):
    with pytest.raises(ValueError, match=message):
        Speedups(**speedups)


def test_more_layers_than_the_unet_has_are_refused():
    with pytest.raises(ValueError, match="step_cache_layers must be 1-2 for this UNet"):
        VideoGenerator(build_demo(4), torch.device("cpu"), Speedups(step_cache=2, step_cache_layers=3))


def test_the_server_serves_with_step_caching(start_server, test_image):
    """STEP_CACHE and STEP_CACHE_LAYERS reach the worker's generator (its start-up line
    lists them), and the server serves a video of the request's shape."""
    server = start_server(STEP_CACHE="2", STEP_CACHE_LAYERS="1")
    response = post(server, test_image, {"seed": 3})
    assert response.status_code == 200, response.text
    assert_video(response.content, frames=DEMO.num_frames, fps=7, size=(DEMO.width, DEMO.height))
    log = server.log.read_text(errors="replace")
    assert "step_cache=2" in log and "step_cache_layers=1" in log, server.log_text()


@pytest.mark.parametrize("env, message", [
    (dict(STEP_CACHE="1"), "use 0 to turn step caching off"),
    (dict(STEP_CACHE_LAYERS="1"), "STEP_CACHE_LAYERS applies to step caching only"),
    (dict(STEP_CACHE="2", STEP_CACHE_LAYERS="4"), "less than or equal to 3"),
])
def test_step_cache_settings_that_cannot_work_are_refused(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(pydantic.ValidationError, match=message):
        Settings()


def test_a_server_with_settings_that_cannot_work_refuses_to_start(start_server):
    server = start_server(wait=False, STEP_CACHE="1")
    assert server.proc.wait(120) != 0
    assert "use 0 to turn step caching off" in server.log_text()
