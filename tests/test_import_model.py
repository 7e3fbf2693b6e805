"""import_model.py end to end: the real command, a real BentoML model store, the hub
replaced by the local stand-in (tests/fake_hub.py) because no hub is reachable here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, builds_a_store
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
UNET16 = "unet/diffusion_pytorch_model.fp16.safetensors"


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    base = make_tiny_repo(root, SVD_XT, image_decoder_file="svd_xt_image_decoder.safetensors", seed=3)
    make_tiny_turbo_repo(root, base, seed=5)
    return root


def environment(home: Path, **env: str) -> dict[str, str]:
    """The test's environment less what would leak in from the machine: a model store and a
    download cache under `home`, no token, endpoint or debug switch unless given."""
    full_env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true",
                "HF_HOME": str(home / "hf"), **env}
    for var in ("HF_TOKEN", "HF_ENDPOINT", "MODEL_VERSION", "MODEL_TAG", "BENTOSVD_DEBUG"):
        if var not in env:
            full_env.pop(var, None)
    return full_env


def run(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=environment(home, **env),
                          capture_output=True, text=True, timeout=300)


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


@builds_a_store
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


@builds_a_store
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


@builds_a_store
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


@builds_a_store
def test_hub_import_without_token_says_how_to_fix(tmp_path, hub_root):
    with FakeHub(hub_root) as hub:
        result = run(tmp_path, "import_model.py", "--variant", "svd_xt", HF_ENDPOINT=hub.url)
    assert_one_paragraph(result, "HF_TOKEN", f"huggingface.co/{SVD_XT}")


@builds_a_store
@pytest.mark.parametrize("args,env,phrases", [
    ((), {"HF_TOKEN": NOT_GRANTED_TOKEN}, ("licence", "not been granted", "HTTP 403")),
    (("--revision", "no-such-branch"), {"HF_TOKEN": GOOD_TOKEN}, ("Revision 'no-such-branch' was not found",)),
], ids=["licence not accepted", "bad revision"])
def test_hub_failures_are_one_paragraph(tmp_path, hub_root, args, env, phrases):
    with FakeHub(hub_root) as hub:
        result = run(tmp_path, "import_model.py", "--variant", "svd_xt", *args,
                     HF_ENDPOINT=hub.url, **env)
    assert_one_paragraph(result, *phrases)


@builds_a_store
def test_an_unreachable_hub_is_one_paragraph_and_debug_shows_the_traceback(tmp_path):
    url = closed_port_url()
    result = run(tmp_path, "import_model.py", "--variant", "svd_xt", HF_ENDPOINT=url, HF_TOKEN=GOOD_TOKEN)
    assert_one_paragraph(result, "could not be reached", url, "--from-dir")
    debug = run(tmp_path, "import_model.py", "--variant", "svd_xt", HF_ENDPOINT=url,
                HF_TOKEN=GOOD_TOKEN, BENTOSVD_DEBUG="1")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@builds_a_store
def test_make_serve_with_no_hub_is_one_paragraph(tmp_path):
    """What `make serve MODEL_VERSION=svd_xt` runs first (the Makefile's `import` target):
    the variant is not in the (empty) model store, and the hub cannot be reached."""
    url = closed_port_url()
    result = run(tmp_path, "import_model.py", "--if-missing", MODEL_VERSION="svd_xt", HF_ENDPOINT=url)
    assert_one_paragraph(result, "could not be reached", url, "git clone", "--from-dir")
    assert not (tmp_path / "models" / "svd_xt").exists()


@builds_a_store
def test_make_import_with_no_hub_stops_with_the_paragraph(tmp_path):
    """`make import` itself (as `make serve` runs it): make stops, non-zero, after the paragraph."""
    venv = Path(sys.prefix)
    installed = venv / ".installed"
    if shutil.which("make") is None or not installed.is_file():
        pytest.skip("needs make and the venv `make install` made")
    env = {k: v for k, v in environment(tmp_path, HF_ENDPOINT=closed_port_url()).items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    make = ["make", "-C", str(ROOT), f"VENV={venv}", "MODEL_VERSION=svd_xt"]
    if subprocess.run([*make, "-q", str(installed)], env=env, capture_output=True).returncode != 0:
        pytest.skip("the venv is older than requirements*.txt: `make import` would reinstall it")
    result = subprocess.run([*make, "import"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert "--if-missing" in result.stdout  # the command make ran
    paragraph, hint, make_says = result.stderr.strip().splitlines()[-3:]
    assert paragraph.startswith("import_model.py: Could not download ") and "could not be reached" in paragraph
    assert hint.endswith("shows the traceback)") and "Error 1" in make_says


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs, so that a disk really fills up: ENOSPC comes from the kernel, where it
    would on a full disk. Mounting one needs root (as `make image` does); else skipped."""
    where = tmp_path / "small_disk"
    where.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small disk with")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {mount.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Write a file of zeros that leaves `leave` bytes free on `disk`."""
    filler = disk / "filler"
    left = shutil.disk_usage(disk).free - leave
    with open(filler, "wb") as f:
        while left > 0:
            left -= f.write(bytes(min(left, 1 << 20)))
    return filler


def cached_files(hf_home: Path) -> set[str]:
    """SVD-XT's files in the huggingface_hub cache: those that finished downloading."""
    snapshots = hf_home / "hub" / f"models--{SVD_XT.replace('/', '--')}" / "snapshots"
    return {p.relative_to(s).as_posix() for s in snapshots.glob("*") for p in s.rglob("*") if p.is_file()}


@builds_a_store
@pytest.mark.parametrize("where", ["HF_HOME", "TMPDIR"], ids=["download cache", "staging folder"])
def test_a_full_disk_is_one_paragraph_and_the_rerun_after_freeing_space_finishes(
        tmp_path, hub_root, small_disk, where):
    """The download cache (HF_HOME) or the staging folder (TMPDIR) on a disk with 1 MB left:
    the 2.7 MB UNet does not fit. One paragraph naming that disk; once space is freed the same
    command finishes, without fetching again the files that were complete."""
    filler = fill(small_disk, leave=1_000_000)
    hf_home = small_disk / "hf" if where == "HF_HOME" else tmp_path / "hf"
    with FakeHub(hub_root) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": GOOD_TOKEN, "MODEL_VERSION": "svd_xt",
               "HF_HOME": str(hf_home)}
        if where == "TMPDIR":
            env["TMPDIR"] = str(small_disk)
        full = run(tmp_path, "import_model.py", "--if-missing", **env)
        finished = cached_files(hf_home)
        if where == "HF_HOME":  # the download stopped
            assert_one_paragraph(full, "The disk is full: downloading", f"cache ({hf_home / 'hub'})",
                                 "MB free there now", "re-run the same command", "HF_HOME")
            assert "Not enough free disk space" not in full.stderr  # huggingface_hub's warning: said once
            assert finished and UNET16 not in finished
        else:  # the download finished, placing the files in the staging folder did not
            assert_one_paragraph(full, f"the disk is full writing {small_disk}/bentosvd-import-", "TMPDIR")
            assert UNET16 in finished
        assert not list(small_disk.rglob("*.incomplete")) and not list(small_disk.glob("bentosvd-import-*"))
        assert not (tmp_path / "models" / "svd_xt").exists()

        filler.unlink()
        hub.clear()
        again = run(tmp_path, "import_model.py", "--if-missing", **env)
        assert again.returncode == 0, again.stderr
        assert "MODEL_VERSION=svd_xt bentoml serve" in again.stdout
        fetched = hub.file_requests("GET")
        assert not finished & set(fetched)  # what finished before is not fetched again
        assert sorted([*fetched, *finished]) == sorted(cached_files(hf_home))


@builds_a_store
def test_a_download_cut_off_midway_is_one_paragraph_and_the_rerun_finishes_it(tmp_path, hub_root):
    """The connection drops in the middle of the UNet's weights and the hub stays away (the
    stand-in's "cut": its port then refuses connections): huggingface_hub's own resume attempts
    fail, the command says so in one paragraph. Once the hub is back the same command finishes;
    files that were complete are not fetched again (the cut one starts over: huggingface_hub
    2.4 keeps no partial file between runs)."""
    with FakeHub(hub_root) as hub:
        hub.fail(SVD_XT, UNET16, "cut")
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": GOOD_TOKEN, "MODEL_VERSION": "svd_xt"}
        cut = run(tmp_path, "import_model.py", "--if-missing", **env)
        assert_one_paragraph(cut, "could not be reached", "Re-run the same command to continue",
                             "are not fetched again")
        assert "Trying to resume download" in cut.stderr  # huggingface_hub tried, the hub was gone
        (unet_get,) = [r for r in hub.requests if r.method == "GET" and r.path.endswith(UNET16)]
        assert unet_get.status == 200 and unet_get.range is None
        finished = cached_files(tmp_path / "hf")
        assert UNET16 not in finished
        assert not (tmp_path / "models" / "svd_xt").exists()

        hub.start()  # the network is back, at the same address
        hub.clear()
        again = run(tmp_path, "import_model.py", "--if-missing", **env)
        assert again.returncode == 0, again.stderr
        fetched = hub.file_requests("GET")
        assert UNET16 in fetched and not finished & set(fetched)
        registered = (tmp_path / "models" / "svd_xt").glob("*/pipeline/unet/diffusion_pytorch_model.fp16.safetensors")
        (unet,) = registered
        assert sha256_file(unet) == hub.repos[SVD_XT].files[UNET16].sha256


def test_a_bug_still_shows_its_traceback(monkeypatch, tmp_path):
    from bentosvd.weights import hub, importer

    def bug(*args, **kwargs):
        raise KeyError("not a user's problem")

    monkeypatch.setattr(hub, "download_variant", bug)
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    with pytest.raises(KeyError):
        importer.main(["--variant", "svd_xt"])


@builds_a_store
def test_image_decoder_variant_from_dir_serves_frame_wise_vae(tmp_path, hub_root):
    result = run(tmp_path, "import_model.py", "--variant", "svd_xt_image_decoder",
                 "--from-dir", str(hub_root / SVD_XT))
    assert result.returncode == 0, result.stderr
    (tag,) = [t for t in models(tmp_path) if t.startswith("svd_xt_image_decoder:")]
    (vae_config,) = (tmp_path / "models" / "svd_xt_image_decoder").glob("*/pipeline/vae/config.json")
    assert json.loads(vae_config.read_text())["_class_name"] == "AutoencoderKL"
    assert info(tmp_path, tag)["labels"]["source"].startswith("dir:")


@builds_a_store
def test_demo_import_is_idempotent_and_if_missing_skips(tmp_path):
    assert run(tmp_path, "import_model.py", "--variant", "demo").returncode == 0
    before = models(tmp_path)
    skipped = run(tmp_path, "import_model.py", "--if-missing", MODEL_VERSION="demo")
    assert skipped.returncode == 0 and "registered already" in skipped.stdout
    assert models(tmp_path).keys() == before.keys()


@builds_a_store
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
