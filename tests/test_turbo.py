"""The turbo variant (AnimateLCM-SVD-xt): its authors' defaults in VARIANTS, its sampler loaded
and seeded, warmed at its own guidance, and the demo turbo served end to end by one real
server (256×144, 4 frames, 4 steps)."""

from __future__ import annotations

import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from bentosvd.config import VARIANTS, Params, Settings
from bentosvd.protocol import GenerationSettings
from bentosvd.svd.generator import VideoGenerator
from bentosvd.svd.turbo_sampler import TURBO_DEFAULTS, TURBO_SCHEDULER_CONFIG, AnimateLCMSVDScheduler
from bentosvd.weights.random_weights import build_demo
from tests.conftest import ROOT, Server, demo_env
from tests.test_jobs import submit, wait_finished
from tests.test_service import assert_video, post, run_blog_curl

TURBO, DEMO_TURBO = VARIANTS["svd_xt_turbo"], VARIANTS["demo_turbo"]


def test_the_turbo_variants_defaults_are_its_authors():
    """VARIANTS (which config.py keeps free of torch) says what TURBO_DEFAULTS cites."""
    for name in ("num_inference_steps", "min_guidance_scale", "max_guidance_scale", "motion_bucket_id",
                 "num_frames", "width", "height"):
        assert getattr(TURBO, name) == TURBO_DEFAULTS[name], name
    assert (TURBO.sampler, TURBO.max_inference_steps, TURBO.store_name) == ("animatelcm", 8, "svd_xt_turbo")
    # The fps conditioning and noise the request defaults give are theirs too.
    assert Params().fps_id + 1 == TURBO_DEFAULTS["fps"]
    assert Params().cond_aug == TURBO_DEFAULTS["noise_aug_strength"]
    same = ("sampler", "num_inference_steps", "max_inference_steps", "min_guidance_scale",
            "max_guidance_scale", "motion_bucket_id")
    assert {k: getattr(DEMO_TURBO, k) for k in same} == {k: getattr(TURBO, k) for k in same}
    assert DEMO_TURBO.demo and not TURBO.demo


def test_step_cache_is_refused_with_a_turbo_variant():
    with pytest.raises(ValidationError, match="STEP_CACHE=3 is not for MODEL_VERSION=svd_xt_turbo"):
        Settings(model_version="svd_xt_turbo", step_cache=3)
    assert Settings(model_version="svd_xt", step_cache=3).step_cache == 3


def settings(seed: int, steps: int = 4) -> GenerationSettings:
    return GenerationSettings(num_frames=4, num_inference_steps=steps, min_guidance_scale=1.0,
                              max_guidance_scale=1.0, fps=7, motion_bucket_id=80, noise_aug_strength=0.02,
                              decode_chunk_size=4, seed=seed)


def test_a_seed_gives_the_same_video_whatever_torchs_global_rng():
    """The sampler re-noises between steps; its noise is the request's seed's, not torch's
    global generator's (which diffusers' step() call would leave it with)."""
    gen = VideoGenerator(build_demo(4, sampler="animatelcm"), torch.device("cpu"))
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    torch.manual_seed(1)
    first = gen.generate(image, settings(seed=5))
    torch.manual_seed(2)
    assert np.array_equal(gen.generate(image, settings(seed=5)), first)
    assert not np.array_equal(gen.generate(image, settings(seed=6)), first)


def test_warm_up_runs_the_variants_guidance():
    """Guidance 1 (the turbo's) is one UNet call of batch 1 a step: the shape requests run."""
    gen = VideoGenerator(build_demo(4, sampler="animatelcm"), torch.device("cpu"))
    batches = []
    gen.pipe.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    gen.warm_up(4, 64, 64, TURBO.min_guidance_scale, TURBO.max_guidance_scale)
    assert batches == [1]
    gen.warm_up(4, 64, 64)  # SVD's guidance: the batch of two
    assert batches == [1, 2]


def test_the_saved_scheduler_config_picks_the_class(tmp_path):
    from bentosvd.svd.loading import load_parts, save_parts

    for sampler, expected in (("animatelcm", AnimateLCMSVDScheduler), ("euler", None)):
        folder = tmp_path / sampler
        save_parts(build_demo(2, sampler=sampler), folder / "pipeline", folder / "encoder", fp16_files=False)
        scheduler = load_parts(folder / "pipeline", folder / "encoder", torch.device("cpu"),
                               torch.float32)["scheduler"]
        if expected is None:
            assert type(scheduler).__name__ == "EulerDiscreteScheduler"
        else:
            assert type(scheduler) is expected
            assert {k: scheduler.config[k] for k in TURBO_SCHEDULER_CONFIG} == TURBO_SCHEDULER_CONFIG


# ------------------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def turbo_server(tmp_path_factory):
    """`bentoml serve` with the demo turbo, registered by import_model.py in a store of its own."""
    home = tmp_path_factory.mktemp("turbo_home")
    env = demo_env(home, MODEL_VERSION="demo_turbo", WARMUP='["landscape"]',
                   JOBS_DIR=str(tmp_path_factory.mktemp("turbo_jobs")))
    subprocess.run([sys.executable, "import_model.py", "--variant", "demo_turbo", "--no-rife"], cwd=ROOT,
                   env=env, check=True, capture_output=True)
    server = Server(["service:svc"], env, ROOT, tmp_path_factory.mktemp("turbo_server") / "server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


SIZE = (DEMO_TURBO.width, DEMO_TURBO.height)


@pytest.mark.server
def test_the_blog_curl_gets_the_turbo_video(turbo_server, test_image, tmp_path):
    headers, video = run_blog_curl(turbo_server, test_image, tmp_path)
    assert "x-model: demo_turbo" in headers and "x-model-warning: demo model" in headers
    assert_video(video, frames=DEMO_TURBO.num_frames, fps=7, size=SIZE)


@pytest.mark.server
def test_info_gives_the_turbo_defaults_and_bounds(turbo_server):
    info = httpx.get(f"{turbo_server.url}/info", timeout=10).json()
    assert info["model"] == "demo_turbo" and info["num_inference_steps"] == 4 and info["warning"]
    params = info["params"]
    assert (params["num_inference_steps"]["default"], params["num_inference_steps"]["minimum"],
            params["num_inference_steps"]["maximum"]) == (4, 1, 8)
    assert params["motion_bucket_id"]["default"] == 80
    assert params["min_guidance_scale"]["default"] == params["max_guidance_scale"]["default"] == 1.0


@pytest.mark.server
def test_the_defaults_are_the_authors_and_a_seed_repeats(turbo_server, test_image):
    """Params left out are the authors' (4 steps, no guidance, motion 80): the same bytes as
    asking for them, as a second request with the seed, and as a job, which runs 4 steps."""
    first = post(turbo_server, test_image, {"seed": 7})
    assert first.status_code == 200, first.text
    assert_video(first.content, frames=DEMO_TURBO.num_frames, fps=7, size=SIZE)
    assert post(turbo_server, test_image, {"seed": 7}).content == first.content
    explicit = {"seed": 7, "num_inference_steps": 4, "motion_bucket_id": 80, "min_guidance_scale": 1.0,
                "max_guidance_scale": 1.0}
    assert post(turbo_server, test_image, explicit).content == first.content
    assert post(turbo_server, test_image, {"seed": 7, "motion_bucket_id": 127}).content != first.content

    job = submit(turbo_server, test_image, {"seed": 7})
    assert job.status_code == 202 and job.json()["total_steps"] == 4, job.text
    final, _ = wait_finished(turbo_server, job.json()["id"])
    assert final["status"] == "succeeded" and final["step"] == 4, final
    assert httpx.get(f"{turbo_server.url}{final['result_url']}", timeout=30).content == first.content


@pytest.mark.server
def test_guidance_above_1_still_works(turbo_server, test_image):
    """The authors' app offers guidance up to 2 (classifier-free guidance on: twice the work)."""
    response = post(turbo_server, test_image, {"seed": 7, "min_guidance_scale": 1.0, "max_guidance_scale": 1.2})
    assert response.status_code == 200, response.text
    assert_video(response.content, frames=DEMO_TURBO.num_frames, fps=7, size=SIZE)


@pytest.mark.server
@pytest.mark.parametrize("steps", [1, DEMO_TURBO.max_inference_steps])
def test_one_to_eight_steps(turbo_server, test_image, steps):
    response = post(turbo_server, test_image, {"seed": 3, "num_inference_steps": steps})
    assert response.status_code == 200, response.text
    assert_video(response.content, frames=DEMO_TURBO.num_frames, fps=7, size=SIZE)


@pytest.mark.server
@pytest.mark.parametrize("steps, fix", [(DEMO_TURBO.max_inference_steps + 1, "use 1 to 8"), (0, None)])
def test_steps_beyond_the_bounds_get_400_naming_the_field(turbo_server, test_image, steps, fix):
    response = post(turbo_server, test_image, {"num_inference_steps": steps})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["field"] == "params.num_inference_steps", body
    if fix:
        assert body["fix"] == fix and "demo_turbo takes at most 8" in body["message"], body
