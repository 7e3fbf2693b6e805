"""`import_model.py` registers RIFE in the model store: from a file, from a hub repo's file
(the local stand-in for the hub, tests/fake_hub.py), or with random weights for the demo;
weights that are not RIFE's get one paragraph and exit 1."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from fake_hub import GOOD_TOKEN, FakeHub  # noqa: E402

from bentosvd.rife.ifnet import build_random  # noqa: E402
from tests.conftest import ROOT, builds_a_store  # noqa: E402

# Each test runs import_model.py in a process of its own, building a model store.
pytestmark = builds_a_store

LIST = ("import bentoml, json; print(json.dumps([[str(m.tag), m.info.labels] "
        "for m in bentoml.models.list() if m.tag.name == 'rife']))")


def run(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true",
            "HF_HOME": str(home / "hf"), **env}
    for name in {"HF_TOKEN", "HF_ENDPOINT", "BENTOSVD_DEBUG"} - set(env):
        full.pop(name, None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=300)


def registered(home: Path) -> list:
    import json

    done = run(home, "-c", LIST)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def flownet(tmp_path) -> Path:
    path = tmp_path / "flownet.pkl"
    state = {f"module.{k}": v for k, v in build_random("demo", seed=3).state_dict().items()}
    torch.save(state, path)
    return path


def test_from_a_file_with_its_version_and_checksum(tmp_path, flownet):
    done = run(tmp_path / "home", "import_model.py", "--rife-file", str(flownet))
    assert done.returncode == 0, done.stderr
    (tag, labels), = registered(tmp_path / "home")
    assert tag.startswith("rife:") and labels["version"] == "4.6"
    assert labels["sha256"] == hashlib.sha256(flownet.read_bytes()).hexdigest()
    assert labels["source"] == f"file:{flownet.resolve()}"
    again = run(tmp_path / "home", "import_model.py", "--rife-file", str(flownet))
    assert again.returncode == 0 and "already registered" in again.stdout
    assert len(registered(tmp_path / "home")) == 1


def test_from_a_hub_repo_with_the_commit(tmp_path, flownet):
    repo = tmp_path / "hub" / "someone" / "rife46"
    repo.mkdir(parents=True)
    (repo / "flownet.pkl").write_bytes(flownet.read_bytes())
    with FakeHub(tmp_path / "hub") as hub:
        done = run(tmp_path / "home", "import_model.py", "--rife-hub", "someone/rife46", "flownet.pkl",
                   HF_ENDPOINT=hub.url, HF_TOKEN=GOOD_TOKEN)
        commit = hub.repos["someone/rife46"].refs["main"]
    assert done.returncode == 0, done.stderr
    (tag, labels), = registered(tmp_path / "home")
    assert labels["source"] == "hf:someone/rife46/flownet.pkl" and labels["revision"] == commit


def test_not_rife_weights_get_one_paragraph(tmp_path):
    bad = tmp_path / "model.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, bad)
    done = run(tmp_path / "home", "import_model.py", "--rife-file", str(bad))
    assert done.returncode == 1, done.stderr
    assert "cannot be registered as RIFE" in done.stderr and "Traceback" not in done.stderr
    assert registered(tmp_path / "home") == []


@pytest.mark.slow  # huggingface_hub retries an unreachable hub for about 20 s before it gives up
def test_an_unreachable_hub_gets_one_paragraph(tmp_path):
    done = run(tmp_path / "home", "import_model.py", "--rife-hub", "someone/rife46", "flownet.pkl",
               HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN=GOOD_TOKEN)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
