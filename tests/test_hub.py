"""bentosvd.weights.hub against a local fake hub: real huggingface_hub client, real HTTP, tiny random-weight repos."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_hub import (  # noqa: E402
    GOOD_TOKEN,
    NOT_GRANTED_TOKEN,
    TINY_IMAGE_VAE_CONFIG,
    TURBO_REPO,
    FakeHub,
    closed_port_url,
    make_tiny_repo,
    make_tiny_turbo_repo,
)

from bentosvd.weights import hub  # noqa: E402
from bentosvd.weights.hub import (  # noqa: E402
    DownloadError,
    MissingFilesError,
    copy_from_dir,
    download_variant,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SVD = "stabilityai/stable-video-diffusion-img2vid"
SVD_XT = "stabilityai/stable-video-diffusion-img2vid-xt"
UNET16 = "unet/diffusion_pytorch_model.fp16.safetensors"

FP16_FILES = {
    "model_index.json",
    "feature_extractor/preprocessor_config.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    UNET16,
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "image_encoder/config.json",
    "image_encoder/model.fp16.safetensors",
}
DEST_FILES = {f if f.startswith("image_encoder/") else f"pipeline/{f}" for f in FP16_FILES}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    svd_xt = make_tiny_repo(root, SVD_XT, image_decoder_file="svd_xt_image_decoder.safetensors", seed=2)
    return {
        SVD: make_tiny_repo(root, SVD, image_decoder_file="svd_image_decoder.safetensors", seed=1),
        SVD_XT: svd_xt,
        TURBO_REPO: make_tiny_turbo_repo(root, svd_xt, seed=4),  # {file: its state dict}
        "root": root,
    }


@pytest.fixture
def fake_hub(repos):
    with FakeHub(repos["root"]) as server:
        yield server


@pytest.fixture(autouse=True)
def isolated_hf(tmp_path, monkeypatch):
    """No token, endpoint or cache from the machine running the tests leaks in."""
    from huggingface_hub import constants
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def download(fake_hub, variant, dest, cache, **kwargs):
    kwargs.setdefault("token", GOOD_TOKEN)
    kwargs.setdefault("endpoint", fake_hub.url)
    return download_variant(variant, dest, cache_dir=cache, **kwargs)


def check_files(meta: dict, dest: Path) -> None:
    """`files` lists exactly the files under dest/pipeline and dest/image_encoder, with their sha256."""
    on_disk = {
        p.relative_to(dest).as_posix()
        for sub in ("pipeline", "image_encoder")
        for p in (dest / sub).rglob("*")
        if p.is_file()
    }
    assert set(meta["files"]) == on_disk
    for rel, digest in meta["files"].items():
        assert sha256(dest / rel) == digest, rel
        assert not (dest / rel).is_symlink()


# ------------------------------------------------------------------------------------------------------------
# Downloads
# ------------------------------------------------------------------------------------------------------------


def test_download_svd_fetches_only_fp16_files(fake_hub, repos, tmp_path, cache):
    dest = tmp_path / "model"
    meta = download(fake_hub, "svd", dest, cache)

    repo = fake_hub.repos[SVD]
    assert meta["variant"] == "svd"
    assert meta["repo_id"] == SVD
    assert meta["revision"] == repo.commit
    assert meta["source"] == "hub"
    assert meta["decoder"] == "temporal"
    assert meta["weights"] == {"unet": "fp16", "vae": "fp16", "image_encoder": "fp16"}
    assert meta["dtype"] == "float16"
    assert set(meta["files"]) == DEST_FILES
    check_files(meta, dest)
    for rel in FP16_FILES:  # byte-identical to the repo's files
        placed = dest / (rel if rel.startswith("image_encoder/") else f"pipeline/{rel}")
        assert meta["files"][placed.relative_to(dest).as_posix()] == repo.files[rel].sha256

    gets = fake_hub.file_requests("GET", SVD)
    assert sorted(gets) == sorted(FP16_FILES)  # each wanted file once, nothing else
    heads = fake_hub.file_requests("HEAD")
    for never in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                  "image_encoder/model.safetensors", "svd.safetensors", "svd_image_decoder.safetensors", "README.md"):
        assert never not in gets and never not in heads
    assert not [r for r in fake_hub.requests if "xet" in r.path.lower()]
    assert all(r.authorization == f"Bearer {GOOD_TOKEN}" for r in fake_hub.requests)


def test_second_run_fetches_nothing_and_works_offline(fake_hub, tmp_path, cache):
    dest = tmp_path / "model"
    first = download(fake_hub, "svd", dest, cache)
    (dest / "model.yaml").write_text("owned by the caller\n")
    fake_hub.clear()

    second = download(fake_hub, "svd", dest, cache)
    assert second == first
    assert fake_hub.file_requests("GET") == [] and fake_hub.file_requests("HEAD") == []
    assert all(r.path.startswith("/api/models/") for r in fake_hub.requests)  # only the revision lookup
    assert (dest / "model.yaml").read_text() == "owned by the caller\n"  # the rest of dest is left alone
    assert sorted(p.name for p in dest.iterdir()) == ["image_encoder", "model.yaml", "pipeline"]
    check_files(second, dest)

    # Hub gone: the complete cached snapshot is used.
    third = download(fake_hub, "svd", tmp_path / "offline", cache, endpoint=closed_port_url())
    assert third == first


def test_pinned_commit_revision(fake_hub, tmp_path, cache):
    commit = fake_hub.repos[SVD].commit
    meta = download(fake_hub, "svd", tmp_path / "m", cache, revision=commit)
    assert meta["revision"] == commit
    assert not [r for r in fake_hub.requests if "/revision/" in r.path]  # a commit needs no lookup


def test_dropped_connection_resumes_with_range(fake_hub, tmp_path, cache, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub writes (and so can resume from) whole 10 MB chunks; real weight files are GBs, the tiny
    # unet is 2.6 MB, so use smaller chunks for the resume point to land inside the file.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    size = fake_hub.repos[SVD].files[UNET16].size
    fake_hub.fail(SVD, UNET16, "drop")  # half the body, then the connection is closed
    meta = download(fake_hub, "svd", tmp_path / "model", cache)

    unet_gets = [r for r in fake_hub.requests if r.method == "GET" and r.path.endswith(UNET16)]
    assert len(unet_gets) == 2 and unet_gets[0].range is None
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", unet_gets[1].range).group(1))
    assert size // 2 - 64 * 1024 < resumed_at <= size // 2  # only the rest is fetched again
    assert unet_gets[1].status == 206
    assert meta["files"][f"pipeline/{UNET16}"] == fake_hub.repos[SVD].files[UNET16].sha256
    check_files(meta, tmp_path / "model")


def test_failed_run_is_finished_by_the_next_one(fake_hub, tmp_path, cache):
    dest = tmp_path / "model"
    fake_hub.fail(SVD, UNET16, "drop", "503")  # cut mid-file, then the resume attempt fails
    with pytest.raises(DownloadError, match="Re-run"):
        download(fake_hub, "svd", dest, cache)
    assert not (dest / "pipeline").exists()  # nothing half-placed
    first_gets = fake_hub.file_requests("GET")
    fake_hub.clear()

    meta = download(fake_hub, "svd", dest, cache)
    second_gets = fake_hub.file_requests("GET")
    assert UNET16 in second_gets
    finished_before = {f for f in first_gets if f != UNET16}
    assert not finished_before & set(second_gets)  # files that completed are not fetched again
    assert sorted(set(first_gets) | set(second_gets)) == sorted(FP16_FILES)
    assert meta["files"][f"pipeline/{UNET16}"] == fake_hub.repos[SVD].files[UNET16].sha256
    check_files(meta, dest)


def test_image_decoder_variant_converts_vae(fake_hub, repos, tmp_path, cache):
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    dest = tmp_path / "model"
    meta = download(fake_hub, "svd_xt_image_decoder", dest, cache)

    assert meta["decoder"] == "image" and meta["weights"]["vae"] == "fp16"
    gets = fake_hub.file_requests("GET", SVD_XT)
    assert "svd_xt_image_decoder.safetensors" in gets
    assert "vae/diffusion_pytorch_model.fp16.safetensors" not in gets  # the temporal VAE is not needed
    assert "svd_xt.safetensors" not in gets and "unet/diffusion_pytorch_model.safetensors" not in gets
    check_files(meta, dest)

    vae_dir = dest / "pipeline" / "vae"
    config = json.loads((vae_dir / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL"
    assert config["block_out_channels"] == list(TINY_IMAGE_VAE_CONFIG["block_out_channels"])  # from the tensors
    assert config["sample_size"] == 768 and config["scaling_factor"] == 0.18215  # from the temporal config
    index = json.loads((dest / "pipeline" / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"]

    saved = load_file(vae_dir / "diffusion_pytorch_model.fp16.safetensors")
    expected = repos[SVD_XT].image_vae_state
    assert set(saved) == set(expected)
    assert all(t.dtype == torch.float16 for t in saved.values())
    for key in expected:  # every tensor, including the 1x1-conv attention weights LDM stores as 4-D
        torch.testing.assert_close(saved[key], expected[key].half(), rtol=0, atol=0, msg=key)

    vae, info = AutoencoderKL.from_pretrained(vae_dir, variant="fp16", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize("variant", ["svd_xt", "svd_xt_image_decoder"])
def test_downloaded_pipeline_loads_and_runs(fake_hub, tmp_path, cache, variant):
    import numpy as np
    import torch
    from diffusers import StableVideoDiffusionPipeline
    from PIL import Image
    from transformers import CLIPVisionModelWithProjection

    dest = tmp_path / "model"
    download(fake_hub, variant, dest, cache)
    encoder = CLIPVisionModelWithProjection.from_pretrained(dest / "image_encoder", variant="fp16", dtype=torch.float32)
    pipe = StableVideoDiffusionPipeline.from_pretrained(
        dest / "pipeline", image_encoder=encoder, variant="fp16", dtype=torch.float32
    )
    expected_vae = "AutoencoderKL" if variant.endswith("image_decoder") else "AutoencoderKLTemporalDecoder"
    assert type(pipe.vae).__name__ == expected_vae
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    frames = pipe(image, height=64, width=64, num_frames=2, num_inference_steps=2, decode_chunk_size=2,
                  output_type="np", generator=torch.Generator().manual_seed(0)).frames
    assert np.asarray(frames).shape == (1, 2, 64, 64, 3)
    assert np.isfinite(np.asarray(frames)).all()


# ------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token, status, reason",
    [(None, 401, "no token"), ("hf_wrong", 401, "invalid"), (NOT_GRANTED_TOKEN, 403, "not been granted")],
)
def test_gated_repo_without_access(fake_hub, tmp_path, cache, token, status, reason):
    dest = tmp_path / "model"
    with pytest.raises(DownloadError) as excinfo:
        download(fake_hub, "svd", dest, cache, token=token)
    message = str(excinfo.value)
    assert "HF_TOKEN" in message
    assert f"https://huggingface.co/{SVD}" in message
    assert "licence" in message and reason in message and f"HTTP {status}" in message
    assert not (dest / "pipeline").exists()
    assert any(r.status == status for r in fake_hub.requests)


def test_unknown_revision(fake_hub, tmp_path, cache):
    with pytest.raises(DownloadError, match=r"Revision 'no-such-branch' was not found in " + SVD):
        download(fake_hub, "svd", tmp_path / "model", cache, revision="no-such-branch")


def test_unreachable_endpoint(tmp_path, cache):
    url = closed_port_url()
    with pytest.raises(DownloadError) as excinfo:
        download_variant("svd", tmp_path / "model", endpoint=url, token=GOOD_TOKEN, cache_dir=cache)
    message = str(excinfo.value)
    assert "could not be reached" in message and url in message and "--from-dir" in message


def test_unknown_variant(tmp_path):
    with pytest.raises(ValueError, match="svd_xt_1_1"):
        download_variant("svd_xxl", tmp_path)


def test_hf_endpoint_and_hf_token_from_the_environment(fake_hub, tmp_path):
    """huggingface_hub reads HF_ENDPOINT (and HF_HOME) at import time: run that case in a fresh interpreter."""
    hf_home = tmp_path / "env_hf_home"
    dest = tmp_path / "model"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_ENDPOINT=fake_hub.url, HF_TOKEN=GOOD_TOKEN, HF_HOME=str(hf_home),
               HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(REPO_ROOT))
    code = (
        "import json, sys; from pathlib import Path; from bentosvd.weights.hub import download_variant; "
        "print(json.dumps(download_variant('svd', Path(sys.argv[1]))))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(dest)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(proc.stdout.strip().splitlines()[-1])
    assert meta["revision"] == fake_hub.repos[SVD].commit
    assert sorted(fake_hub.file_requests("GET", SVD)) == sorted(FP16_FILES)
    # (a fresh huggingface_hub also asks HF_ENDPOINT for /api/agent-harnesses, its user-agent registry)
    repo_requests = [r for r in fake_hub.requests if SVD in r.path]
    assert repo_requests and all(r.authorization == f"Bearer {GOOD_TOKEN}" for r in repo_requests)
    assert (hf_home / "hub" / "models--stabilityai--stable-video-diffusion-img2vid").is_dir()
    check_files(meta, dest)


# ------------------------------------------------------------------------------------------------------------
# copy_from_dir
# ------------------------------------------------------------------------------------------------------------


def test_copy_from_dir_prefers_fp16(repos, tmp_path):
    src = repos[SVD].path  # holds fp16, fp32 and the original checkpoints, like a full clone
    dest = tmp_path / "model"
    meta = copy_from_dir("svd", src, dest)
    assert meta["source"] == "dir" and meta["revision"] is None and meta["repo_id"] == SVD
    assert meta["weights"] == {"unet": "fp16", "vae": "fp16", "image_encoder": "fp16"}
    assert set(meta["files"]) == DEST_FILES
    check_files(meta, dest)


def test_copy_from_dir_full_precision_image_decoder(repos, tmp_path):
    import torch
    from diffusers import AutoencoderKL, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionModelWithProjection

    src = tmp_path / "clone"
    shutil.copytree(repos[SVD_XT].path, src, ignore=shutil.ignore_patterns("*.fp16.safetensors"))
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (src / ".git" / "refs" / "heads").mkdir(parents=True)
    (src / ".git" / "refs" / "heads" / "main").write_text("ab" * 20 + "\n")

    dest = tmp_path / "model"
    meta = copy_from_dir("svd_xt_image_decoder", src, dest)
    assert meta["revision"] == "ab" * 20
    assert meta["weights"] == {"unet": "fp32", "image_encoder": "fp32", "vae": "fp32"}
    assert meta["dtype"] == "float32"
    assert "pipeline/unet/diffusion_pytorch_model.safetensors" in meta["files"]
    assert "image_encoder/model.safetensors" in meta["files"]
    assert "pipeline/vae/diffusion_pytorch_model.safetensors" in meta["files"]
    check_files(meta, dest)

    vae = AutoencoderKL.from_pretrained(dest / "pipeline" / "vae")
    assert vae.dtype == torch.float32
    expected = repos[SVD_XT].image_vae_state
    torch.testing.assert_close(vae.state_dict()["decoder.mid_block.attentions.0.to_q.weight"],
                               expected["decoder.mid_block.attentions.0.to_q.weight"])
    UNetSpatioTemporalConditionModel.from_pretrained(dest / "pipeline" / "unet")
    CLIPVisionModelWithProjection.from_pretrained(dest / "image_encoder")


def test_copy_from_dir_reports_missing_files(repos, tmp_path):
    src = tmp_path / "clone"
    shutil.copytree(repos[SVD_XT].path, src)
    (src / "model_index.json").unlink()
    for name in ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors"):
        (src / "unet" / name).unlink()
    (src / "image_encoder" / "model.safetensors").unlink()
    lfs_pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"
    (src / "image_encoder" / "model.fp16.safetensors").write_text(lfs_pointer)
    data = (src / "svd_xt_image_decoder.safetensors").read_bytes()
    (src / "svd_xt_image_decoder.safetensors").write_bytes(data[: len(data) // 2])  # truncated copy

    dest = tmp_path / "model"
    with pytest.raises(MissingFilesError) as excinfo:
        copy_from_dir("svd_xt_image_decoder", src, dest)
    error = excinfo.value
    assert isinstance(error, FileNotFoundError)
    text = str(error)
    assert "model_index.json" in error.missing
    assert "unet/diffusion_pytorch_model.fp16.safetensors (missing)" in text
    assert "unet/diffusion_pytorch_model.safetensors (missing)" in text
    assert "image_encoder/model.fp16.safetensors (a git-lfs pointer" in text and "git lfs pull" in text
    assert "svd_xt_image_decoder.safetensors (truncated" in text
    assert len(error.missing) == 4
    assert not dest.exists() or not any(dest.iterdir())

    with pytest.raises(FileNotFoundError, match="not a directory"):
        copy_from_dir("svd", tmp_path / "nowhere", dest)


def test_allow_patterns_never_match_unwanted_files():
    from huggingface_hub.utils import filter_repo_objects

    repo_files = sorted(FP16_FILES | {
        "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
        "image_encoder/model.safetensors", "svd.safetensors", "svd_image_decoder.safetensors",
        "svd_xt.safetensors", "svd_xt_image_decoder.safetensors", "README.md", ".gitattributes", "output_tile.gif",
    })
    for variant in hub.HUB_SOURCES:
        picked = set(filter_repo_objects(repo_files, allow_patterns=hub.hub_allow_patterns(variant)))
        expected = set(FP16_FILES)
        if variant.endswith("image_decoder"):
            expected.discard("vae/diffusion_pytorch_model.fp16.safetensors")
        if hub.HUB_SOURCES[variant].unet_file:  # the turbo's UNet comes from its own repo
            expected.discard(UNET16)
        assert picked == expected, variant


# ------------------------------------------------------------------------------------------------------------
# The turbo variant: AnimateLCM-SVD-xt's UNet file + SVD-XT's other parts
# ------------------------------------------------------------------------------------------------------------

TURBO_UNET = "AnimateLCM-SVD-xt-1.1.safetensors"


def assert_turbo_layout(dest: Path, state: dict) -> None:
    """The UNet is the given state dict, cast to fp16, under SVD-XT's unet config; the scheduler is the
    AnimateLCM sampler's, with its authors' settings."""
    import torch
    from safetensors.torch import load_file

    from bentosvd.svd.turbo_sampler import TURBO_SCHEDULER_CONFIG

    saved = load_file(dest / "pipeline" / UNET16)
    assert saved.keys() == state.keys()
    for key, tensor in state.items():
        assert saved[key].dtype == torch.float16
        torch.testing.assert_close(saved[key], tensor.half(), rtol=0, atol=0, msg=key)
    scheduler = json.loads((dest / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "AnimateLCMSVDScheduler"
    assert {k: scheduler[k] for k in TURBO_SCHEDULER_CONFIG} == TURBO_SCHEDULER_CONFIG


def test_turbo_download_takes_the_unet_file_from_its_authors_repo(fake_hub, repos, tmp_path, cache):
    dest = tmp_path / "model"
    meta = download(fake_hub, "svd_xt_turbo", dest, cache)

    # SVD-XT's files less its UNet's weights; of the authors' repo, the one file their app loads.
    assert sorted(fake_hub.file_requests("GET", SVD_XT)) == sorted(FP16_FILES - {UNET16})
    assert fake_hub.file_requests("GET", TURBO_REPO) == [TURBO_UNET]
    assert meta["repo_id"] == SVD_XT and meta["revision"] == fake_hub.repos[SVD_XT].commit
    assert meta["unet"] == {"repo_id": TURBO_REPO, "revision": fake_hub.repos[TURBO_REPO].commit,
                            "file": TURBO_UNET, "sha256": fake_hub.repos[TURBO_REPO].files[TURBO_UNET].sha256}
    assert meta["weights"] == {"unet": "fp16", "vae": "fp16", "image_encoder": "fp16"}
    assert set(meta["files"]) == DEST_FILES
    check_files(meta, dest)
    assert_turbo_layout(dest, repos[TURBO_REPO][TURBO_UNET])
    # The scheduler config was replaced, not written through its hard link into the download cache.
    (cached,) = cache.glob("models--stabilityai--stable-video-diffusion-img2vid-xt/snapshots/*/scheduler/*.json")
    assert json.loads(cached.read_text())["_class_name"] == "EulerDiscreteScheduler"

    # --revision names the UNet's repo (SVD-XT's parts stay at their pinned revision).
    with pytest.raises(DownloadError, match=f"Revision 'no-such-branch' was not found in {TURBO_REPO}"):
        download(fake_hub, "svd_xt_turbo", tmp_path / "other", cache, revision="no-such-branch")


def test_turbo_loads_with_its_sampler_and_runs(fake_hub, tmp_path, cache):
    import numpy as np
    import torch

    from bentosvd.protocol import GenerationSettings
    from bentosvd.svd.generator import VideoGenerator
    from bentosvd.svd.loading import load_parts
    from bentosvd.svd.turbo_sampler import AnimateLCMSVDScheduler

    dest = tmp_path / "model"
    download(fake_hub, "svd_xt_turbo", dest, cache)
    parts = load_parts(dest / "pipeline", dest / "image_encoder", torch.device("cpu"), torch.float32)
    assert type(parts["scheduler"]) is AnimateLCMSVDScheduler
    settings = GenerationSettings(num_frames=2, num_inference_steps=2, min_guidance_scale=1.0,
                                  max_guidance_scale=1.0, fps=7, motion_bucket_id=80, noise_aug_strength=0.02,
                                  decode_chunk_size=2, seed=0)
    video = VideoGenerator(parts, torch.device("cpu")).generate(np.zeros((64, 64, 3), np.uint8), settings)
    assert video.shape == (2, 64, 64, 3) and video.dtype == np.uint8


def test_turbo_from_dirs(repos, tmp_path):
    """SVD-XT's copy plus the UNet file named by unet_from (the 1.0 file here), or a copy of the authors' repo
    (its default file), or nothing: then the message says what is missing and where it comes from."""
    turbo = repos["root"] / TURBO_REPO
    meta = copy_from_dir("svd_xt_turbo", repos[SVD_XT].path, tmp_path / "a",
                         unet_from=turbo / "AnimateLCM-SVD-xt.safetensors")
    assert meta["unet"]["file"] == "AnimateLCM-SVD-xt.safetensors" and meta["dtype"] == "float16"
    assert_turbo_layout(tmp_path / "a", repos[TURBO_REPO]["AnimateLCM-SVD-xt.safetensors"])
    check_files(meta, tmp_path / "a")

    meta = copy_from_dir("svd_xt_turbo", repos[SVD_XT].path, tmp_path / "b", unet_from=turbo)
    assert meta["unet"]["file"] == TURBO_UNET
    assert_turbo_layout(tmp_path / "b", repos[TURBO_REPO][TURBO_UNET])

    with pytest.raises(MissingFilesError) as excinfo:
        copy_from_dir("svd_xt_turbo", repos[SVD_XT].path, tmp_path / "c")
    text = str(excinfo.value)
    assert f"{TURBO_UNET} (missing)" in text and f"huggingface.co/{TURBO_REPO}" in text and "--unet-from" in text


def test_turbo_refuses_a_file_that_is_not_svd_xts_unet(repos, tmp_path):
    """Checked as the authors load it (strict): a file of other tensors names what is wrong."""
    with pytest.raises(hub.ConversionError) as excinfo:
        copy_from_dir("svd_xt_turbo", repos[SVD_XT].path, tmp_path / "model",
                      unet_from=repos[SVD_XT].path / "svd_xt_image_decoder.safetensors")
    text = str(excinfo.value)
    assert "not a state dict of SVD-XT's UNet" in text, text
    assert "keys missing (e.g. add_embedding." in text and "keys unexpected (e.g. conditioner." in text
    assert not (tmp_path / "model" / "pipeline").exists()


def test_turbo_repo_names_are_the_samplers():
    from bentosvd.svd.turbo_sampler import TURBO_HUB_REPO, TURBO_UNET_FILES

    source = hub.HUB_SOURCES["svd_xt_turbo"]
    assert (source.unet_repo_id, source.unet_file) == (TURBO_HUB_REPO, TURBO_UNET_FILES["default"])
    assert source.repo_id == SVD_XT and TURBO_REPO == TURBO_HUB_REPO
