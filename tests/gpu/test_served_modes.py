"""Every documented server setting, served for real on a CUDA GPU with the full-size
synthetic SVD-XT (random weights): one real request each, checked for a 200, a valid video
and its GPU memory (torch's peak, and the whole process as the driver counts it).

Run on a GPU machine with `make test-gpu` (see docs/contributing.md); CI has no GPU and does
not collect this folder. One shared compile cache serves every mode, and the first mode
(the default fast path) fills it, so the whole suite fits one 10-minute device command.
Each mode's numbers go to $GPU_RESULTS (JSON) when it is set.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from bentosvd.config import VARIANTS
from tests.conftest import ROOT, Server
from tests.test_service import assert_video

torch = pytest.importorskip("torch")
pynvml = pytest.importorskip("pynvml")

pytestmark = pytest.mark.gpu
VARIANT = VARIANTS["svd_xt"]
STEPS = 4  # few steps: the modes' set-up, not the denoising, is under test
GIB = 2**30
RESULTS: dict = {}

if not torch.cuda.is_available():
    pytest.fail("tests/gpu needs a CUDA GPU: run it with `make test-gpu` on a GPU machine",
                pytrace=False)


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory) -> tuple[Path, str]:
    """A model store holding the full-size synthetic SVD-XT: (BENTOML_HOME, MODEL_TAG)."""
    home = tmp_path_factory.mktemp("gpu_home")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    done = subprocess.run([sys.executable, "import_model.py", "--variant", VARIANT.name,
                           "--synthetic"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return home, done.stdout.split("MODEL_TAG=")[1].split()[0]


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> str:
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or str(tmp_path_factory.mktemp("inductor"))


class DeviceMemory:
    """The GPU's used memory as the driver reports it, sampled every 50 ms in a thread: the
    most seen, less what was in use before the server started, is the server's footprint
    (CUDA context, allocator cache and all), which nvidia-smi would show per process."""

    def __init__(self, index: int = 0):
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.baseline = self.used()
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def used(self) -> int:
        return pynvml.nvmlDeviceGetMemoryInfo(self.handle).used

    def _sample(self):
        while not self._stop.wait(0.05):
            self.most = max(self.most, self.used())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.most - self.baseline


def serve(store, cache: str, tmp_path: Path, ready_timeout: float, **env) -> Server:
    home, tag = store
    full_env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true",
                "MODEL_VERSION": VARIANT.name, "MODEL_TAG": tag, "COMPILE_CACHE_DIR": cache,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.pop("PREPEND_PATH", None),
                                                            os.environ.get("PYTHONPATH")])),
                "WARMUP": '["landscape"]', **env}
    server = Server(["service:svc"], full_env, ROOT, tmp_path / "server.log")
    started = time.monotonic()
    server.wait_ready(ready_timeout)
    server.ready_s = time.monotonic() - started
    return server


def torch_peak(server) -> int:
    """The last generation's peak of torch's allocator, from the server's /metrics."""
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    values = re.findall(r"^svd_gpu_memory_peak_bytes\{[^}]*\} (\S+)$", metrics, re.M)
    assert values, metrics[-2000:]
    return int(float(values[-1]))


def generate(server, params: dict, size=(1024, 576)) -> tuple[httpx.Response, float]:
    import io

    import numpy as np
    from PIL import Image
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    started = time.monotonic()
    response = httpx.post(f"{server.url}/generate", timeout=300,
                          files={"img": ("image.png", buf.getvalue(), "image/png")},
                          data={"params": json.dumps(params)})
    return response, time.monotonic() - started


def check_video(response, params: dict, size: tuple[int, int]) -> None:
    assert response.status_code == 200, response.text[:1000]
    frames = params.get("num_frames") or VARIANT.num_frames
    assert_video(response.content, frames=frames, fps=params.get("fps_id", 6) + 1, size=size)


def record(mode: str, **values) -> None:
    RESULTS.setdefault(mode, {}).update(values)
    print(f"\n{mode}: {json.dumps(values)}", flush=True)
    if os.environ.get("GPU_RESULTS"):
        Path(os.environ["GPU_RESULTS"]).write_text(json.dumps(RESULTS, indent=1))


FEW = {"seed": 0, "num_inference_steps": STEPS}


def run_mode(mode: str, store, cache, tmp_path, requests: list[tuple[str, dict, tuple]],
             ready_timeout: float = 120, **env) -> dict:
    """Serve with `env`, send each (name, params, image size), check and record them."""
    memory = DeviceMemory()
    server = serve(store, cache, tmp_path, ready_timeout, **env)
    try:
        timings = {}
        for name, params, size in requests:
            response, seconds = generate(server, params, size)
            check_video(response, params, size)  # the video takes the image's orientation
            timings[name] = {"seconds": round(seconds, 2), "torch_peak_gib": round(torch_peak(server) / GIB, 2),
                             "server_timing": response.headers.get("server-timing")}
        process = memory.stop()
        record(mode, env=env, ready_s=round(server.ready_s, 1), requests=timings,
               process_gib=round(process / GIB, 2))
        return RESULTS[mode]
    finally:
        server.stop()


LANDSCAPE, PORTRAIT = (1024, 576), (576, 1024)


def test_default_fast_path_with_eager_fallbacks(synthetic_store, compile_cache, tmp_path):
    """The default: compiled UNet and decoder, warmed for landscape only here; a portrait
    image (not warmed) runs eagerly, and so does a decoding_t other than the warmed 1."""
    result = run_mode("fast_path", synthetic_store, compile_cache, tmp_path, ready_timeout=420,
                      requests=[("landscape", FEW, LANDSCAPE),
                                ("portrait_eager", FEW, PORTRAIT),
                                ("decoding_t_5_eager", {**FEW, "decoding_t": 5}, LANDSCAPE)])
    assert result["process_gib"] < 40


def test_low_memory_serves_the_blog_request_within_8_gib(synthetic_store, compile_cache, tmp_path):
    """The blog's own request (SVD-XT's 30 steps) with model offload: the whole process,
    CUDA context and allocator cache included, must fit a card of 8 GiB."""
    blog = {"fps_id": 6, "motion_bucket_id": 127, "cond_aug": 0.02, "decoding_t": 1, "seed": None}
    result = run_mode("low_memory", synthetic_store, compile_cache, tmp_path,
                      requests=[("blog_curl", blog, LANDSCAPE)],
                      LOW_MEMORY="true", FAST_PATH="false")
    assert result["process_gib"] <= 8.0, result


def test_step_cache(synthetic_store, compile_cache, tmp_path):
    run_mode("step_cache", synthetic_store, compile_cache, tmp_path, ready_timeout=300,
             requests=[("landscape", {**FEW, "num_inference_steps": 6}, LANDSCAPE)],
             STEP_CACHE="3", STEP_CACHE_LAYERS="1")


def test_fp8(synthetic_store, compile_cache, tmp_path):
    """FP8 matmuls (torchao). Nothing warmed, so it runs eagerly: compiling FP8 in-process
    takes minutes that would not leave the suite inside one device command."""
    if os.environ.get("TORCHAO_PATH") is None:
        pytest.importorskip("torchao", reason="FP8 needs torchao (TORCHAO_PATH)")
    run_mode("fp8", synthetic_store, compile_cache, tmp_path,
             requests=[("landscape_eager", FEW, LANDSCAPE)],
             FP8="true", WARMUP="[]", PREPEND_PATH=os.environ.get("TORCHAO_PATH"))


def test_two_gpu_workers(synthetic_store, compile_cache, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"GPU_WORKERS=2 needs 2 GPUs; this machine has {torch.cuda.device_count()}")
    run_mode("gpu_workers_2", synthetic_store, compile_cache, tmp_path, ready_timeout=300,
             requests=[("landscape_1", FEW, LANDSCAPE), ("landscape_2", FEW, LANDSCAPE)],
             GPU_WORKERS="2")
