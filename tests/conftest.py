"""Fixtures that run the real thing: a model store with the demo model, a real
`bentoml serve` on a free port, and test images made with Pillow."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

# tests/gpu needs a CUDA GPU: `make test-gpu` sets BENTOSVD_GPU_TESTS; elsewhere (CI) it is
# not collected at all rather than skipped test by test.
collect_ignore = [] if os.environ.get("BENTOSVD_GPU_TESTS") else ["gpu"]

# Inductor's CPU kernels without SIMD, in this process and every one it starts (servers,
# benchmarks, child processes inherit it): what the CPU tests check is the service's
# handling of compiled code (warm-ups, saved blocks, guards, fallbacks), never kernel speed,
# and scalar C++ compiles in well under half the time of vectorised C++, while the compiled
# demo still generates about as fast as eager. Set before torch is imported (its config
# reads it then).
#
# And each compiled graph's wrapper in C++, built with its kernels as one library
# (TORCHINDUCTOR_CPP_WRAPPER): fewer compiler runs, so less CPU for the same compiled
# blocks; the blocks are traced, guarded, saved and loaded as with the Python wrapper.
#
# And one OpenMP thread per process: `make test` runs several pytest processes on two
# cores, each driving servers and child processes of its own, and torch on two threads in
# each would take the cores from the others (a thread waiting at a parallel region's end
# spins while the one it waits for has no core). The figures are in docs/journal.md.
if not os.environ.get("BENTOSVD_GPU_TESTS"):
    os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")
    os.environ.setdefault("TORCHINDUCTOR_CPP_WRAPPER", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# The longest files (a cold compile in a server, killed servers, compiled blocks, the
# benchmark), longest first: `make test` hands whole files to its processes in this order
# (--no-loadscope-reorder), and a long file started last would leave one process idle at
# the end.
LONGEST_FIRST = ("test_fresh_node.py", "test_fast_path.py", "test_stepcache.py",
                 "test_saved_regions.py", "test_layout.py", "test_reliability.py",
                 "test_durable_jobs.py", "test_service.py", "test_bench.py",
                 "test_import_model.py", "test_webhooks.py", "test_jobs.py",
                 "test_rife_import.py", "test_cfg_parallel.py", "test_replicas.py",
                 "test_turbo.py", "test_ui.py")

# Files that compile the same blocks (the demo UNet's, channels-last, landscape: IN_PROCESS
# and SAVED in test_saved_regions) go to one process as one unit, in this order, so that
# the later ones find the kernels in Inductor's cache instead of compiling them at the same
# time as the first, and the saved blocks (`saved_blocks`) are compiled once for the last
# two (`pytest_xdist_make_scheduler` below).
ONE_PROCESS = ("test_fast_path.py", "test_stepcache.py", "test_saved_regions.py", "test_layout.py")


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` with ONE_PROCESS's files handed out as one unit. (xdist's own
    loadgroup cannot be used: it renames the tests' node ids, which pytest 9 ignores.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FilesScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return "compiled blocks" if Path(file).name in ONE_PROCESS else file

    return FilesScheduling(config, log)


@pytest.fixture(scope="session")
def saved_blocks(tmp_path_factory):
    """The demo UNet's blocks and VAE decoder compiled ahead of time for the landscape shape
    (test_saved_regions' SAVED) into a folder: (folder, what the warm-up counted, the video
    then made). Built once per test process for test_saved_regions and test_layout (one
    unit, ONE_PROCESS), which only read the folder: a test that adds to it copies it."""
    from bentosvd.weights.random_weights import build_demo
    from tests.test_saved_regions import IMAGE, SETTINGS, warmed

    folder = tmp_path_factory.mktemp("saved_blocks")
    gen = warmed(build_demo(4), folder)
    return folder, dict(gen.saved_regions.counts), gen.generate(IMAGE, SETTINGS)


# For a test that runs import_model.py (or the RIFE import) in a process of its own, building
# a model store (the `server` marker's second half): seconds of torch imports each, so the
# quick loop (`make test-unit`) leaves it to `make test`, as it does a server.
builds_a_store = pytest.mark.server


def pytest_collection_modifyitems(items):
    """Tests that start a real server (or build the model store it serves) are marked
    `server`, so that `make test-unit` can leave them out; `make test` runs everything.
    The files go in LONGEST_FIRST's order."""
    for item in items:
        if {"server_factory", "bentoml_home"} & set(item.fixturenames):
            item.add_marker(pytest.mark.server)

    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)  # stable: the order within a file and among the rest is kept


BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def bentoml_home(tmp_path_factory) -> Path:
    """A model store of its own, with the demo model registered by import_model.py."""
    home = tmp_path_factory.mktemp("bentoml_home")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    subprocess.run([sys.executable, "import_model.py", "--variant", "demo"], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    return home


class Server:
    """A `bentoml serve` process and its URL; its log is kept for failure messages."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", *args, "--host", "127.0.0.1", "--port",
             str(self.port)],
            cwd=cwd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 300, every: float = 0.5) -> list:
        """Poll /readyz every `every` s until it answers 200; what it answered before (a
        status, or the error's name while nothing listened). `timeout`: a limit for a
        server that will never be ready, not a speed check (beside cold compiles on CI's
        two cores, a start has taken over 120 s)."""
        deadline, not_ready = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log_text()}")
            try:
                status = httpx.get(f"{self.url}/readyz", timeout=2).status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            if status == 200:
                return not_ready
            not_ready.append(status)
            time.sleep(every)
        raise TimeoutError(f"server not ready in {timeout} s: {not_ready[-5:]}\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]

    def processes(self) -> list[psutil.Process]:
        """The server and every process under it (BentoML's service workers each run in a
        session of their own, so its process group is not all of them)."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """Every process of the server at once, as when its node dies: no shutdown runs."""
        for process in self.processes():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            processes = self.processes()
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            # A worker left behind by a server that did not stop cleanly goes too.
            for process in psutil.wait_procs(processes, timeout=10)[1]:
                process.kill()


def demo_env(bentoml_home: Path, **env: str) -> dict[str, str]:
    """The environment the demo servers run in: this one, the test model store, `env`."""
    return {**os.environ, "BENTOML_HOME": str(bentoml_home), "MODEL_VERSION": "demo",
            "BENTOML_DO_NOT_TRACK": "true", "PYTHONPATH": str(ROOT), **env}


@pytest.fixture(scope="session")
def server_factory(bentoml_home, tmp_path_factory):
    """Start servers with the demo model: `server_factory(args, **env)`. They run until the
    session ends: for servers that several tests share (module or session fixtures)."""
    servers = []

    def start(args=("service:svc",), cwd=ROOT, wait=True, **env) -> Server:
        # Async jobs kept in a folder of the server's own, unless the test shares one
        # (a restart, replicas).
        env.setdefault("JOBS_DIR", str(tmp_path_factory.mktemp("jobs")))
        # No shape warmed before ready: seconds of CPU less for every server the suite
        # starts. The tests of the warm-up ask for it (the shared `server` keeps the default).
        env.setdefault("WARMUP", "[]")
        full_env = demo_env(bentoml_home, **env)
        log = tmp_path_factory.mktemp("server") / "server.log"
        server = Server(list(args), full_env, cwd, log)
        servers.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def module_server(server_factory):
    """Start servers that one test file shares: `module_server(args, **env)`; they stop
    when the file's tests are done, so that idle servers do not stay for the session."""
    servers = []

    def start(*args, **kwargs) -> Server:
        servers.append(server := server_factory(*args, **kwargs))
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def start_server(server_factory):
    """Start a server of this test's own: `start_server(args, **env)`; it stops when the
    test ends, so that finished tests' servers do not take the CPU from the next ones."""
    servers = []

    def start(*args, wait=True, **kwargs) -> Server:
        servers.append(server := server_factory(*args, wait=False, **kwargs))
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server_tmp(tmp_path_factory) -> Path:
    """The main server's TMPDIR, so tests can see whether requests leave files behind."""
    return tmp_path_factory.mktemp("server_tmp")


@pytest.fixture(scope="session")
def server(server_factory, server_tmp) -> Server:
    """The demo service as `make serve` runs it (BENTOML_CONFIG set), shared by the tests
    that do not disturb each other."""
    return server_factory(BENTOML_CONFIG=str(ROOT / "bentoml_configuration.yaml"), TMPDIR=str(server_tmp),
                          WARMUP='["landscape", "portrait"]')  # the default


def make_image(path: Path, size=(800, 600), mode="RGB", fmt="PNG", seed=0) -> Path:
    rng = np.random.default_rng(seed)
    w, h = size
    # A smooth gradient plus noise: compresses like a photo, differs per seed.
    gradient = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    pixels = np.clip(gradient + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, format=fmt)
    return path


@pytest.fixture(scope="session")
def test_image(tmp_path_factory) -> Path:
    return make_image(tmp_path_factory.mktemp("img") / "test_image.png")
