"""A real image, built from the Bento and started (docs/deploy.md, "Build and run the image
without Docker"): scripts/build_image.sh builds the CPU demo image with `bentoml containerize
--backend buildah`, scripts/run_image.sh starts its entrypoint from the image's filesystem, and
the blog's curl, the image's HEALTHCHECK and a clean stop are checked against it.

`make image` runs this file (BENTOSVD_IMAGE_TESTS=1): a cold build takes minutes, more than
`make test` has left. Without root (or sudo) it skips, except on CI, where it fails."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from tests.conftest import BIN, ROOT, free_port
from tests.test_service import DEMO, assert_video, run_blog_curl

pytestmark = [pytest.mark.image, pytest.mark.slow, pytest.mark.timeout(1800)]

if not os.environ.get("BENTOSVD_IMAGE_TESTS"):
    pytest.skip("builds and starts the OCI image: run by `make image` (BENTOSVD_IMAGE_TESTS=1)",
                allow_module_level=True)

IMAGE = os.environ.get("IMAGE", "localhost/bentosvd:demo")
BUILD, RUN = ROOT / "scripts/build_image.sh", ROOT / "scripts/run_image.sh"
NAME = f"bentosvd-test-{os.getpid()}"


def missing(reason: str):
    """On CI the image must be built and checked: what is missing fails the test there."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the image tests must run)")
    pytest.skip(reason)


def root_command() -> list[str]:
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n", "-E"]
    missing("building and starting the image needs root or sudo without a password")


def buildah_inspect(kind: str, name: str) -> dict:
    done = subprocess.run([*root_command(), "buildah", "inspect", "--type", kind, name],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def image() -> dict:
    """The image, built now by scripts/build_image.sh (warm: the base image and the pip layer
    are reused)."""
    env = {**os.environ, "IMAGE": IMAGE, "VENV": str(BIN.parent)}
    started = time.monotonic()
    done = subprocess.run([*root_command(), "bash", str(BUILD)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1700)
    assert done.returncode == 0, f"build_image.sh failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    print(f"\n{done.stdout}built in {time.monotonic() - started:.0f} s")
    return buildah_inspect("image", IMAGE)


def run_image(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*root_command(), "bash", str(RUN), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def container(image):
    """The image's entrypoint started from its filesystem, port 3000 published on a free port;
    ready when /readyz answers 200."""
    port = free_port()
    env = {**os.environ, "IMAGE": IMAGE, "NAME": NAME, "PORT": str(port)}
    # As `make` runs everything. Without it BentoML's usage tracking looks up t.bentoml.com
    # when the server stops; the container has no way out, so that waits 10 s for DNS.
    started = run_image("start", "-e", "BENTOML_DO_NOT_TRACK=true", env=env)
    assert started.returncode == 0, f"run_image.sh start failed:\n{started.stdout}\n{started.stderr}"
    url = started.stdout.strip().splitlines()[-1]
    assert url == f"http://127.0.0.1:{port}", started.stdout
    log = Path(os.environ.get("IMAGE_WORK", "/var/tmp/bentosvd-image")) / "run" / f"{NAME}.log"
    box = SimpleNamespace(url=url, port=port, env=env, log=log, stopped=None)
    deadline, t0 = time.monotonic() + 300, time.monotonic()
    while True:
        assert run_image("status", env=env).returncode == 0, f"the container exited:\n{log.read_text()[-5000:]}"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"not ready in 300 s:\n{log.read_text()[-5000:]}"
        time.sleep(1)
    print(f"\nready {time.monotonic() - t0:.0f} s after start")
    yield box
    if box.stopped is None:
        run_image("stop", env=env)
    for path in (log, log.with_name(log.name + ".socat")):
        path.unlink(missing_ok=True)


def docker_duration(text: str) -> int:
    """A Dockerfile duration (10m, 30s, 1m30s) in nanoseconds, as the image config keeps it."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}
    return int(sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)) * 10**9)


def test_image_is_the_demo_bento_on_the_debian_base(image):
    config = image["Docker"]["config"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["MODEL_VERSION"] == "demo"  # --build-arg MODEL_VERSION=demo, as docs/deploy.md says
    assert env["BENTOML_CONFIG"] == "/home/bentoml/bento/src/bentoml_configuration.yaml"
    assert config["User"] == "bentoml" and config["WorkingDir"] == "/home/bentoml/bento"
    assert config["Entrypoint"] == ["/home/bentoml/bento/env/docker/entrypoint.sh"]
    assert "3000/tcp" in config["ExposedPorts"]
    # Built on the mmdebstrap base: its layer is the image's first.
    base = buildah_inspect("image", os.environ.get("BASE_IMAGE", "localhost/bentosvd-base:bookworm"))
    assert image["OCIv1"]["rootfs"]["diff_ids"][0] == base["OCIv1"]["rootfs"]["diff_ids"][0]
    assert "mmdebstrap" in base["OCIv1"]["config"]["Labels"]["org.opencontainers.image.description"]


def test_healthcheck_is_the_cuda_templates(image):
    """The HEALTHCHECK comes from deploy/Dockerfile.template's block, as the CUDA image has it."""
    template = (ROOT / "deploy/Dockerfile.template").read_text().replace("\\\n", " ")
    line = re.search(r"^HEALTHCHECK (.*?) CMD (.*)$", template, re.M)
    options = dict(re.findall(r"--([\w-]+)=(\S+)", line[1]))
    check = image["Docker"]["config"]["Healthcheck"]
    assert check["Test"] == ["CMD-SHELL", line[2].strip()]
    assert check["Test"][1].startswith("curl -fsS http://localhost:3000/livez")
    assert check["Interval"] == docker_duration(options["interval"])
    assert check["Timeout"] == docker_duration(options["timeout"])
    assert check["StartPeriod"] == docker_duration(options["start-period"])
    assert check["Retries"] == int(options["retries"])


def test_image_answers_the_blog_curl(container, test_image, tmp_path):
    headers, video = run_blog_curl(container, test_image, tmp_path)  # localhost:3000 -> the published port
    assert "x-model: demo" in headers
    info = assert_video(video, frames=DEMO.num_frames, fps=7, size=(DEMO.width, DEMO.height))
    print(f"\nthe blog's curl against the image: {len(video)} bytes, {info}")
    log = container.log.read_text()
    assert 'Starting production HTTP BentoServer from "/home/bentoml/bento"' in log


def test_inside_the_container(container):
    """The server runs as the image's user, from its Bento, with the image's CPU torch."""
    done = run_image("exec", "sh", "-c", 'id -un; pwd; hostname; tr "\\0" " " </proc/1/cmdline; echo; '
                     'python -c "import torch; print(torch.__version__)"', env=container.env)
    assert done.returncode == 0, done.stderr
    user, cwd, hostname, pid1, torch_version = done.stdout.splitlines()
    assert (user, cwd, hostname) == ("bentoml", "/home/bentoml/bento", NAME)
    assert pid1.split()[1:] == ["/app/.venv/bin/bentoml", "serve", "/home/bentoml/bento"]  # PID 1
    assert torch_version.endswith("+cpu")


def test_healthcheck_passes_inside(container):
    """The image's HEALTHCHECK command, run inside the running container (its network: the
    server's port 3000 there), exits 0."""
    done = run_image("healthcheck", env=container.env)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "curl -fsS http://localhost:3000/livez" in done.stdout
    # And it is the server it asks: the same command fails against a port nothing listens on.
    wrong = run_image("exec", "/bin/sh", "-c", "curl -fsS http://localhost:3999/livez || exit 1",
                      env=container.env)
    assert wrong.returncode == 1


def test_stops_cleanly(container):
    """SIGTERM to PID 1, as `docker stop` sends: the server exits 0 before docker stop's
    default 10 s run out, and the container, its namespaces and its processes are gone."""
    done = run_image("stop", env=container.env, timeout=120)
    container.stopped = done
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{container.log.read_text()[-3000:]}"
    stopped = re.search(r"stopped \S+ after ([\d.]+) s: exit status 0", done.stdout)
    assert stopped and float(stopped[1]) < 10, done.stdout
    assert "SIGKILL" not in done.stdout
    assert run_image("status", env=container.env).returncode == 1
    netns = subprocess.run([*root_command(), "ip", "netns", "list"], capture_output=True, text=True)
    assert NAME not in netns.stdout
    containers = subprocess.run([*root_command(), "buildah", "containers", "--format", "{{.ContainerName}}"],
                                capture_output=True, text=True)
    assert NAME not in containers.stdout.split()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{container.url}/livez", timeout=2)
