"""A fresh node on the fast path (torch.compile of the UNet's blocks, the default on CUDA),
served for real on the CPU: ready after one eager generation, serving eagerly while its
blocks compile in the background, compiled from then on, and a restart loading what the
first start compiled. The compiled kernels here are Inductor's CPU ones; what is tested is
the service's handling, not their speed. Its compile cache is its own (a fresh node's), so
it shares no kernels with the other compile tests and runs as a file of its own.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import make_image
from tests.test_service import DEMO, assert_video, post

pytestmark = pytest.mark.slow  # a cold torch.compile on the CPU: minutes


def shapes(server, timeout: float = 120) -> dict:
    """The worker's WARMUP shapes from /info. A worker busy compiling on a loaded machine
    can miss /info's health deadline (it is then listed as `{"loading": true}`): asked
    again until it answers."""
    deadline = time.monotonic() + timeout
    while "shapes" not in (worker := httpx.get(f"{server.url}/info", timeout=30).json()["workers"][0]):
        assert time.monotonic() < deadline, (worker, server.log_text())
        time.sleep(1)
    return worker["shapes"]


@pytest.mark.timeout(1200)  # a cold compile on 2 CPU cores, shared with the other tests
def test_a_fresh_node_serves_while_compiling_and_a_restart_loads(start_server, tmp_path, test_image):
    """With an empty compile cache, /readyz turns 200 after one eager generation, before the
    compiled blocks exist; requests run eagerly while a thread builds them, and from the
    request after that the shape runs compiled, with no restart and no recompiling. Shapes
    not warmed run eagerly throughout. A second server with the same cache
    (COMPILE_CACHE_DIR/aot) loads every block before /readyz (nothing compiled, nothing
    traced) and gives the same video for the same seed. One cold compile serves both
    halves: on 2 CPU cores it costs minutes. With COMPILE_IN_BACKGROUND off, the same cache
    loads before /readyz too."""
    import re

    env = dict(FAST_PATH="true", WARMUP='["landscape"]', COMPILE_CACHE_DIR=str(tmp_path / "cache"),
               # torch logs every recompilation of a compiled function under this setting.
               TORCH_LOGS="recompiles")
    server = start_server(wait=False, **env)
    assert server.wait_ready(timeout=600)  # not ready at first
    log = server.log.read_text(errors="replace")
    # Ready, and the compile not done: its line is written only later.
    assert re.search(r"landscape \(256x144\) runs eagerly \(warmed in [\d.]+ s\) while its \d+ "
                     r"compiled blocks are built in the background", log), server.log_text()
    assert "in the background in" not in log, server.log_text()
    assert "compile_unet=True" in log
    assert shapes(server) in ({"landscape": "compiling"}, {"landscape": "compiled"})

    served_while_compiling = post(server, test_image, {"seed": 3})
    assert served_while_compiling.status_code == 200, served_while_compiling.text
    assert_video(served_while_compiling.content, frames=DEMO.num_frames, fps=7,
                 size=(DEMO.width, DEMO.height))

    deadline = time.monotonic() + 600
    while shapes(server) != {"landscape": "compiled"}:
        assert time.monotonic() < deadline, server.log_text()
        time.sleep(1)
    log = server.log.read_text(errors="replace")
    compiled = re.search(r"compiled landscape \(256x144\) in the background in [\d.]+ s, \d+ "
                         r"rounds? \(compiled blocks: (\d+) compiled\)", log)
    assert compiled and int(compiled[1]) >= 3, server.log_text()  # UNet blocks and the decoder
    after_compile = len(log)

    first_video = post(server, test_image, {"seed": 3})
    assert first_video.status_code == 200, first_video.text
    assert_video(first_video.content, frames=DEMO.num_frames, fps=7, size=(DEMO.width, DEMO.height))
    portrait = post(server, make_image(tmp_path / "tall.png", size=(300, 600)), {"seed": 1})
    assert portrait.status_code == 200, portrait.text
    assert_video(portrait.content, frames=DEMO.num_frames, fps=7, size=(DEMO.height, DEMO.width))
    # Fewer frames than warmed: another shape, also run eagerly.
    short = post(server, test_image, {"seed": 1, "num_frames": 2, "decoding_t": 2})
    assert short.status_code == 200, short.text
    assert_video(short.content, frames=2, fps=7, size=(DEMO.width, DEMO.height))
    log = server.log.read_text(errors="replace")[after_compile:]
    assert "Recompiling" not in log and "ahead of time in" not in log, log
    server.stop()

    server = start_server(wait=False, **env)
    server.wait_ready(timeout=600)
    again_video = post(server, test_image, {"seed": 3})
    assert again_video.status_code == 200, again_video.text
    log = server.log.read_text(errors="replace")
    again = re.search(r"warmed up landscape \(256x144\) in [\d.]+ s \(compiled blocks: (\d+) loaded\)", log)
    assert again and again[1] == compiled[1], log[-3000:]
    assert "ahead of time in" not in log and "Recompiling" not in log and "in the background" not in log
    assert shapes(server) == {"landscape": "compiled"}
    assert len(list((tmp_path / "cache" / "aot").glob("*.bin"))) == int(compiled[1])
    assert again_video.content == first_video.content  # the loaded code computes the same
    server.stop()

    # COMPILE_IN_BACKGROUND=false warms up the old way, compiling what the cache lacks
    # before /readyz (here nothing: it loads); its cold compile is test_saved_regions'.
    server = start_server(wait=False, **env, COMPILE_IN_BACKGROUND="false")
    server.wait_ready(timeout=600)
    log = server.log.read_text(errors="replace")
    # Only the blocks a compiled run calls: not those built for the first, uncompiled one.
    loaded = re.search(r"warmed up landscape \(256x144\) in [\d.]+ s \(compiled blocks: (\d+) loaded\)", log)
    assert loaded and 3 <= int(loaded[1]) <= int(compiled[1]), log[-3000:]
    assert "ahead of time in" not in log
    assert "in the background" not in log
    assert post(server, test_image, {"seed": 3}).content == first_video.content
