"""CFG_PARALLEL=2 (bentosvd/svd/cfg_parallel.py) on the CPU: two processes joined by gloo,
each running one half of the guidance batch of the demo model.

The paired generation is checked against one process (the same frames: exactly those of
one process running the halves one after the other, within one level of uint8 of the
batched run), cancels and peer failures are checked to end within a few seconds and to
leave a pair that works, and the settings that cannot go with it are refused. The speed on
two GPUs is the benchmark's to measure.
"""

from __future__ import annotations

import os
import time

import httpx
import numpy as np
import pydantic
import pytest
import torch

from bentosvd.config import Settings
from bentosvd.protocol import GenerationSettings
from bentosvd.svd.cfg_parallel import GuidancePair, GuidancePeerError, pair_devices
from bentosvd.svd.generator import VideoGenerator, split_guidance_batch
from bentosvd.weights.random_weights import build_demo
from tests.test_service import DEMO, assert_video, post

SETTINGS = GenerationSettings(num_frames=4, num_inference_steps=3, min_guidance_scale=1.0,
                              max_guidance_scale=2.0, fps=7, motion_bucket_id=127,
                              noise_aug_strength=0.02, decode_chunk_size=4, seed=0)
# Small, so that a step takes a fraction of a second on two busy cores.
IMAGE = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
TIMEOUT = 3.0  # the pair's step timeout here
# Frame counts at which the peer's UNet fails (the leader's does not): out of memory, the
# process exits in the middle of a step, the process hangs; and at which the leader's own
# half runs out of memory (the peer's does not).
OOM_FRAMES, EXIT_FRAMES, STUCK_FRAMES, LEADER_OOM_FRAMES = 3, 5, 6, 7


def with_faults(unet: torch.nn.Module, faults: dict) -> torch.nn.Module:
    """`unet`, whose forward does `faults[frames]()` first for those frame counts."""
    forward = unet.forward

    def faulty(sample, *args, **kwargs):
        faults.get(sample.shape[1], lambda: None)()
        return forward(sample, *args, **kwargs)

    unet.forward = faulty
    return unet


def out_of_memory(who: str):
    def fault():
        raise torch.cuda.OutOfMemoryError(f"injected: CUDA out of memory in the {who}")
    return fault


def peer_unet(device: torch.device) -> torch.nn.Module:
    """The peer's UNet: the demo's (the leader's weights), with its faults."""
    return with_faults(build_demo(4)["unet"].to(device), {
        OOM_FRAMES: out_of_memory("peer"), EXIT_FRAMES: lambda: os._exit(3),
        STUCK_FRAMES: lambda: time.sleep(3600)})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread in this process and in the peer (which takes the leader's count):
    two processes that each spin OpenMP threads after their work would take the cores from
    each other (the server's worker sets OMP_WAIT_POLICY=PASSIVE before torch loads instead;
    here torch is loaded already)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair():
    pair = GuidancePair("cpu", "cpu", peer_unet, timeout=TIMEOUT)
    yield pair
    pair.close()


@pytest.fixture(scope="module")
def paired(pair) -> VideoGenerator:
    parts = build_demo(4)
    with_faults(parts["unet"], {LEADER_OOM_FRAMES: out_of_memory("leader")})
    return VideoGenerator(parts, torch.device("cpu"), guidance_pair=pair)


@pytest.fixture(scope="module")
def single() -> VideoGenerator:
    return VideoGenerator(build_demo(4), torch.device("cpu"))


@pytest.fixture(scope="module")
def reference(single) -> np.ndarray:
    return single.generate(IMAGE, SETTINGS)


def settings(**changes) -> GenerationSettings:
    return SETTINGS.model_copy(update=changes)


def test_the_paired_unet_gives_the_batched_result(paired, single):
    config = single.pipe.unet.config
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, config.in_channels, 8, 16, generator=g)
    hidden = torch.cat([torch.zeros(1, 1, config.cross_attention_dim),
                        torch.randn(1, 1, config.cross_attention_dim, generator=g)])
    time_ids = torch.randn(2, 3, generator=g)
    with torch.no_grad():
        batched = single.pipe.unet(sample, torch.tensor(5.0), hidden, time_ids).sample
        halves = paired.pipe.unet(sample, torch.tensor(5.0), hidden, time_ids).sample
    torch.testing.assert_close(halves, batched, rtol=1e-4, atol=1e-5)


def test_a_paired_generation_gives_the_single_process_frames(paired, pair, reference):
    """Exactly the frames of one process running the two halves one after the other (the
    same computation per half), and within one level of uint8 of the batched run."""
    steps = pair.peer_state()["steps"]
    frames = paired.generate(IMAGE, SETTINGS)
    assert pair.peer_state()["steps"] == steps + SETTINGS.num_inference_steps
    one_at_a_time = VideoGenerator(build_demo(4), torch.device("cpu"))
    split_guidance_batch(one_at_a_time.pipe.unet)
    np.testing.assert_array_equal(frames, one_at_a_time.generate(IMAGE, SETTINGS))
    difference = np.abs(frames.astype(int) - reference)
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_without_guidance_the_leader_runs_alone(paired, pair):
    """A guidance of 1 has no unconditional half: a batch of one, not sent to the peer."""
    steps = pair.peer_state()["steps"]
    paired.generate(IMAGE, settings(max_guidance_scale=1.0))
    assert pair.peer_state()["steps"] == steps


def test_a_cancel_between_steps_stops_both_halves(paired, pair, reference):
    class Cancelled(Exception):
        pass

    def cancel_at_2(step, total):
        if step == 2:
            raise Cancelled

    steps = pair.peer_state()["steps"]
    with pytest.raises(Cancelled):
        paired.generate(IMAGE, settings(num_inference_steps=8), on_step=cancel_at_2)
    # It answers (back to waiting, not inside a step) and has run the two steps only.
    assert pair.peer_state()["steps"] == steps + 2
    assert np.abs(paired.generate(IMAGE, SETTINGS).astype(int) - reference).max() <= 1


@pytest.mark.parametrize(("frames", "message"), [
    (OOM_FRAMES, "guidance peer on cpu: .* in the peer"), (LEADER_OOM_FRAMES, "in the leader")])
def test_out_of_memory_in_either_half_fails_the_step_as_such_and_the_pair_stays(
        paired, pair, reference, frames, message):
    """Reported as out of memory (the API's 503, to retry); both processes end the step,
    so the pair stays in step for the next generation."""
    before = pair.peer_state()
    with pytest.raises(torch.cuda.OutOfMemoryError, match=message):
        paired.generate(IMAGE, settings(num_frames=frames))
    assert pair.peer_state() == {**before, "steps": before["steps"] + 1}
    assert np.abs(paired.generate(IMAGE, SETTINGS).astype(int) - reference).max() <= 1


def test_a_peer_dying_in_a_step_fails_it_at_once_and_a_new_peer_takes_over(paired, pair, reference):
    pid = pair.peer_state()["pid"]
    # Noticed as an exit, not waited out to the timeout.
    died = rf"peer process \(pid {pid}, cpu\) exited with code 3"
    with pytest.raises(GuidancePeerError, match=died):
        paired.generate(IMAGE, settings(num_frames=EXIT_FRAMES))
    assert np.abs(paired.generate(IMAGE, SETTINGS).astype(int) - reference).max() <= 1
    assert pair.peer_state()["pid"] != pid


def test_a_stuck_peer_fails_the_step_at_the_timeout_and_is_replaced(paired, pair, reference):
    old = pair.peer_state()["pid"]
    started = time.monotonic()
    late = f"did not finish its half of the step within {TIMEOUT:g} s"
    with pytest.raises(GuidancePeerError, match=late):
        paired.generate(IMAGE, settings(num_frames=STUCK_FRAMES))
    assert TIMEOUT <= time.monotonic() - started < TIMEOUT + 15
    with pytest.raises(ProcessLookupError):
        os.kill(old, 0)  # killed, not left hanging
    assert np.abs(paired.generate(IMAGE, SETTINGS).astype(int) - reference).max() <= 1


def test_close_stops_the_peer():
    pair = GuidancePair("cpu", "cpu", peer_unet, timeout=TIMEOUT)
    process = pair._process
    pair.close()
    assert not process.is_alive()
    pair.close()  # again: nothing left to stop


@pytest.mark.parametrize(("env", "message"), [
    (dict(LOW_MEMORY="true"), "does not work with LOW_MEMORY"),
    (dict(STEP_CACHE="3"), "does not work with STEP_CACHE"),
    (dict(COMPILE_REGIONS="false"), "does not work with COMPILE_REGIONS=false"),
    (dict(MODEL_VERSION="demo_turbo"), "no\\s+second half"),
    (dict(DEVICE="cuda:1"), "set DEVICE to auto or cuda"),
])
def test_settings_that_cannot_go_with_it_are_refused(monkeypatch, env, message):
    for name, value in {"CFG_PARALLEL": "2", **env}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(pydantic.ValidationError, match=message):
        Settings()
    monkeypatch.setenv("CFG_PARALLEL", "1")
    Settings()  # each is fine on its own


def test_settings_accept_a_pair_and_nothing_larger(monkeypatch):
    monkeypatch.setenv("CFG_PARALLEL", "2")
    assert Settings().cfg_parallel == 2
    monkeypatch.setenv("COMPILE_REGIONS", "false")
    monkeypatch.setenv("FAST_PATH", "false")  # nothing compiled: regions do not matter
    assert Settings().cfg_parallel == 2
    monkeypatch.setenv("CFG_PARALLEL", "4")
    with pytest.raises(pydantic.ValidationError, match="less than or equal to 2"):
        Settings()


def test_on_the_cpu_both_halves_take_the_cpu():
    assert pair_devices("cpu", 3) == (torch.device("cpu"), torch.device("cpu"))


def test_the_server_serves_with_a_pair(start_server, test_image):
    """CFG_PARALLEL=2 through `bentoml serve`: the worker's second "GPU" is a second process
    on the CPU; the request gives the video, and GET /info shows the pair."""
    server = start_server(CFG_PARALLEL="2")
    response = post(server, test_image, {"seed": 1})
    assert response.status_code == 200, response.text
    assert_video(response.content, frames=DEMO.num_frames, fps=7, size=(DEMO.width, DEMO.height))
    workers = httpx.get(f"{server.url}/info", timeout=10).json()["workers"]
    assert [w["device"] for w in workers] == ["cpu+cpu"]
