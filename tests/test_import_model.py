"""import_model.py end to end: the real command, a real BentoML model store, the hub
replaced by the local stand-in (tests/fake_hub.py) because no hub is reachable here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.fake_hub import (
    GOOD_TOKEN,
    NOT_GRANTED_TOKEN,
    TURBO_REPO,
    FakeHub,
    closed_port_url,
    make_tiny_repo,
    make_tiny_turbo_repo,
)

SVD_XT = "stabilityai/stable-video-diffusion-img2vid-xt"


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    base = make_tiny_repo(root, SVD_XT, image_decoder_file="svd_xt_image_decoder.safetensors", seed=3)
    make_tiny_turbo_repo(root, base, seed=5)
    return root


def run(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true",
                "HF_HOME": str(home / "hf"), **env}
    for var in ("HF_TOKEN", "MODEL_VERSION", "MODEL_TAG"):
        if var not in env:
            full_env.pop(var, None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=300)


def models(home: Path) -> dict[str, dict]:
    """`bentoml models list` as the user sees it, read back as JSON."""
    out = run(home, "-m", "bentoml", "models", "list", "-o", "json")
    assert out.returncode == 0, out.stderr
    return {m["tag"]: m for m in json.loads(out.stdout)}


def info(home: Path, tag: str) -> dict:
    import yaml

    out = run(home, "-m", "bentoml", "models", "get", tag, "-o", "yaml")
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_hub_import_registers_variant_and_encoder(tmp_path, hub_root):
    with FakeHub(hub_root) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": GOOD_TOKEN, "MODEL_VERSION": "svd_xt"}
        first = run(tmp_path, "import_model.py", **env)
        assert first.returncode == 0, first.stderr
        tags = models(tmp_path)
        assert {t.split(":")[0] for t in tags} == {"svd_xt", "clip-vit-h-14-laion"}
        (variant_tag,) = [t for t in tags if t.startswith("svd_xt:")]
        (encoder_tag,) = [t for t in tags if t.startswith("clip-vit-h-14-laion:")]
        variant = info(tmp_path, variant_tag)
        assert variant["labels"]["variant"] == "svd_xt"
        assert variant["labels"]["source"] == f"hf:{SVD_XT}"
        assert variant["labels"]["image_encoder"] == encoder_tag
        assert variant["labels"]["dtype"] == "float16"
        assert len(variant["labels"]["revision"]) == 40  # the resolved commit
        assert "pipeline/unet/diffusion_pytorch_model.fp16.safetensors" in variant["metadata"]["files"]

        again = run(tmp_path, "import_model.py", **env)
        assert again.returncode == 0, again.stderr
        assert "already registered" in again.stdout
        assert models(tmp_path).keys() == tags.keys()  # re-running registers nothing new


def test_turbo_hub_import_takes_the_unet_from_its_authors_repo(tmp_path, hub_root):
    """svd_xt_turbo: SVD-XT's VAE and encoder, AnimateLCM-SVD-xt's UNet file; the encoder is the very one
    svd_xt registers (same files, same labels: stored once), the UNet's origin is labelled on the variant."""
    unet_file = "AnimateLCM-SVD-xt-1.1.safetensors"
    with FakeHub(hub_root) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": GOOD_TOKEN}
        result = run(tmp_path, "import_model.py", "--variant", "svd_xt_turbo", **env)
        assert result.returncode == 0, result.stderr
        assert "MODEL_VERSION=svd_xt_turbo bentoml serve" in result.stdout
        assert run(tmp_path, "import_model.py", "--variant", "svd_xt", **env).returncode == 0
        turbo_commit = hub.repos[TURBO_REPO].commit
    tags = models(tmp_path)
    assert sorted({t.split(":")[0] for t in tags}) == ["clip-vit-h-14-laion", "svd_xt", "svd_xt_turbo"]
    assert len(tags) == 3  # one encoder for both
    (tag,) = [t for t in tags if t.startswith("svd_xt_turbo:")]
    labels = info(tmp_path, tag)["labels"]
    assert labels["variant"] == "svd_xt_turbo" and labels["source"] == f"hf:{SVD_XT}"
    assert labels["unet_source"] == f"hf:{TURBO_REPO}" and labels["unet_file"] == unet_file
    assert labels["unet_revision"] == turbo_commit
    assert labels["unet_sha256"] == sha256_file(hub_root / TURBO_REPO / unet_file)
    files = info(tmp_path, tag)["metadata"]["files"]
    assert {"pipeline/unet/diffusion_pytorch_model.fp16.safetensors", "pipeline/unet/config.json",
            "pipeline/scheduler/scheduler_config.json"} <= set(files)


def test_turbo_from_dirs(tmp_path, hub_root):
    result = run(tmp_path, "import_model.py", "--variant", "svd_xt_turbo", "--from-dir",
                 str(hub_root / SVD_XT), "--unet-from", str(hub_root / TURBO_REPO))
    assert result.returncode == 0, result.stderr
    import yaml

    (model,) = (tmp_path / "models" / "svd_xt_turbo").glob("*/model.yaml")  # the CLI cuts long labels
    labels = yaml.safe_load(model.read_text())["labels"]
    assert labels["source"] == f"dir:{hub_root / SVD_XT}"
    assert labels["unet_source"] == f"dir:{hub_root / TURBO_REPO}"
    config = model.parent / "pipeline" / "scheduler" / "scheduler_config.json"
    assert json.loads(config.read_text())["_class_name"] == "AnimateLCMSVDScheduler"
    # Without the UNet file: one paragraph saying which file and where it comes from.
    missing = run(tmp_path / "other", "import_model.py", "--variant", "svd_xt_turbo", "--from-dir",
                  str(hub_root / SVD_XT))
    assert_one_paragraph(missing, "AnimateLCM-SVD-xt-1.1.safetensors (missing)", "--unet-from")


def assert_one_paragraph(result: subprocess.CompletedProcess, *phrases: str) -> None:
    """Exit 1 and the one message on stderr, no traceback (that takes --debug)."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # After the download's progress bars, if any: the message, then the --debug hint.
    message = result.stderr[result.stderr.index("import_model.py: "):]
    assert len(message.splitlines()) <= 6 and message.rstrip().endswith("shows the traceback)")
    for phrase in phrases:
        assert phrase in message, (phrase, message)


def test_hub_import_without_token_says_how_to_fix(tmp_path, hub_root):
    with FakeHub(hub_root) as hub:
        result = run(tmp_path, "import_model.py", "--variant", "svd_xt", HF_ENDPOINT=hub.url)
    assert_one_paragraph(result, "HF_TOKEN", f"huggingface.co/{SVD_XT}")


@pytest.mark.parametrize("args,env,phrases", [
    ((), {"HF_TOKEN": NOT_GRANTED_TOKEN}, ("licence", "not been granted", "HTTP 403")),
    (("--revision", "no-such-branch"), {"HF_TOKEN": GOOD_TOKEN}, ("Revision 'no-such-branch' was not found",)),
], ids=["licence not accepted", "bad revision"])
def test_hub_failures_are_one_paragraph(tmp_path, hub_root, args, env, phrases):
    with FakeHub(hub_root) as hub:
        result = run(tmp_path, "import_model.py", "--variant", "svd_xt", *args,
                     HF_ENDPOINT=hub.url, **env)
    assert_one_paragraph(result, *phrases)


def test_an_unreachable_hub_is_one_paragraph_and_debug_shows_the_traceback(tmp_path):
    url = closed_port_url()
    result = run(tmp_path, "import_model.py", "--variant", "svd_xt", HF_ENDPOINT=url, HF_TOKEN=GOOD_TOKEN)
    assert_one_paragraph(result, "could not be reached", url, "--from-dir")
    debug = run(tmp_path, "import_model.py", "--variant", "svd_xt", HF_ENDPOINT=url,
                HF_TOKEN=GOOD_TOKEN, BENTOSVD_DEBUG="1")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_full_disk_is_one_paragraph(monkeypatch, capsys, tmp_path):
    """ENOSPC cannot be made here without mounting a small file system; the download is
    made to raise it where huggingface_hub would."""
    import errno

    from bentosvd.weights import hub, importer

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "blob"))

    monkeypatch.setattr(hub, "download_variant", full)
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    assert importer.main(["--variant", "svd_xt"]) == 1
    err = capsys.readouterr().err
    assert "the disk is full writing" in err and "HF_HOME" in err and "Traceback" not in err


def test_a_bug_still_shows_its_traceback(monkeypatch, tmp_path):
    from bentosvd.weights import hub, importer

    def bug(*args, **kwargs):
        raise KeyError("not a user's problem")

    monkeypatch.setattr(hub, "download_variant", bug)
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    with pytest.raises(KeyError):
        importer.main(["--variant", "svd_xt"])


def test_image_decoder_variant_from_dir_serves_frame_wise_vae(tmp_path, hub_root):
    result = run(tmp_path, "import_model.py", "--variant", "svd_xt_image_decoder",
                 "--from-dir", str(hub_root / SVD_XT))
    assert result.returncode == 0, result.stderr
    (tag,) = [t for t in models(tmp_path) if t.startswith("svd_xt_image_decoder:")]
    (vae_config,) = (tmp_path / "models" / "svd_xt_image_decoder").glob("*/pipeline/vae/config.json")
    assert json.loads(vae_config.read_text())["_class_name"] == "AutoencoderKL"
    assert info(tmp_path, tag)["labels"]["source"].startswith("dir:")


def test_demo_import_is_idempotent_and_if_missing_skips(tmp_path):
    assert run(tmp_path, "import_model.py", "--variant", "demo").returncode == 0
    before = models(tmp_path)
    skipped = run(tmp_path, "import_model.py", "--if-missing", MODEL_VERSION="demo")
    assert skipped.returncode == 0 and "registered already" in skipped.stdout
    assert models(tmp_path).keys() == before.keys()


def test_missing_model_fails_startup_naming_tag_and_command(tmp_path):
    result = run(tmp_path, "-c", "import service", MODEL_VERSION="svd_xt")
    assert result.returncode != 0
    assert "'svd_xt:latest'" in result.stderr
    assert "MODEL_VERSION=svd_xt python import_model.py" in result.stderr


def sha256_file(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_synthetic_model_has_the_full_size_architecture():
    """Built on the meta device: the real shapes without allocating 2.2 B parameters."""
    from bentosvd.weights.random_weights import build_synthetic

    parts = build_synthetic(25, device="meta")
    count = {k: sum(p.numel() for p in parts[k].parameters()) for k in ("unet", "vae", "image_encoder")}
    assert round(count["unet"] / 1e9, 2) == 1.52
    assert round(count["vae"] / 1e6) == 98
    assert round(count["image_encoder"] / 1e6) == 632
    assert parts["unet"].dtype == torch.float16
