"""Fetch the Stable Video Diffusion weights and lay them out for BentoSVD.

Two entry points give the same result:

- `download_variant` fetches a variant from the Hugging Face Hub (or a mirror named by `endpoint` /
  `HF_ENDPOINT`), and
- `copy_from_dir` takes it from a local directory in the repo layout (a `git clone` of the repo with its
  LFS files pulled, or a snapshot folder copied from another machine).

Both only differ in where the files come from; one function (`_assemble`) places them and, for the
`*_image_decoder` variants, converts the frame-wise VAE out of Stability's single-file checkpoint. The turbo
variant (`svd_xt_turbo`) takes SVD-XT's repo without its UNet weights, AnimateLCM-SVD-xt's UNet file from the
authors' repo (a state dict, placed in diffusers' unet layout), and the AnimateLCM sampler's scheduler config.

Layout written under `dest`:

    dest/pipeline/model_index.json
    dest/pipeline/feature_extractor/...
    dest/pipeline/scheduler/...
    dest/pipeline/unet/{config.json, diffusion_pytorch_model[.fp16].safetensors}
    dest/pipeline/vae/{config.json, diffusion_pytorch_model[.fp16].safetensors}
    dest/image_encoder/{config.json, model[.fp16].safetensors}     (CLIP, registered as its own model)

`dest/pipeline` loads with `StableVideoDiffusionPipeline.from_pretrained(dest / "pipeline",
image_encoder=<the CLIP model>, variant="fp16")`. For the image-decoder variants `model_index.json` names
`AutoencoderKL` for `vae`, so the same call loads the frame-wise decoder. The turbo's scheduler is not a
diffusers class: `bentosvd.svd.loading.load_parts` loads the class its scheduler_config.json names.

Nothing here imports BentoML; torch and diffusers are only imported to convert weights (an image-decoder VAE,
the turbo's UNet) and to write the turbo's scheduler config.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import struct
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "HUB_SOURCES",
    "PINNED_REVISIONS",
    "ConversionError",
    "DownloadError",
    "HubSource",
    "MissingFilesError",
    "convert_image_decoder_vae",
    "convert_unet_state_dict",
    "copy_from_dir",
    "download_variant",
    "hub_allow_patterns",
    "sha256_file",
]


# --------------------------------------------------------------------------------------------------------------
# What to fetch
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    image_decoder_file: str | None  # e.g. "svd_image_decoder.safetensors"; None: temporal decoder from vae/
    # The UNet's weights from another repo instead: a file at its root holding a whole state dict (diffusers'
    # key names) of the UNet that repo_id's unet/config.json describes.
    unet_repo_id: str | None = None
    unet_file: str | None = None


_SVD = "stabilityai/stable-video-diffusion-img2vid"
_SVD_XT = "stabilityai/stable-video-diffusion-img2vid-xt"
_SVD_XT_1_1 = "stabilityai/stable-video-diffusion-img2vid-xt-1-1"
# = bentosvd.svd.turbo_sampler's TURBO_HUB_REPO and TURBO_UNET_FILES["default"] (what the authors' app.py
# loads); named here too so that importing this module imports no torch (a test keeps them equal).
_TURBO = "wangfuyun/AnimateLCM-SVD-xt"
_TURBO_UNET = "AnimateLCM-SVD-xt-1.1.safetensors"

HUB_SOURCES: dict[str, HubSource] = {
    "svd": HubSource(_SVD, None),
    "svd_image_decoder": HubSource(_SVD, "svd_image_decoder.safetensors"),
    "svd_xt": HubSource(_SVD_XT, None),
    "svd_xt_image_decoder": HubSource(_SVD_XT, "svd_xt_image_decoder.safetensors"),
    "svd_xt_1_1": HubSource(_SVD_XT_1_1, None),
    "svd_xt_turbo": HubSource(_SVD_XT, None, unet_repo_id=_TURBO, unet_file=_TURBO_UNET),
}

# Revision downloaded when the caller names none. The commit hashes of the upstream repos cannot be looked up
# offline, so these follow the default branch; pass `revision=` (a branch, tag or 40-hex commit) to pin one.
# The commit actually downloaded is always returned in the metadata (`"revision"`), so a build records it.
PINNED_REVISIONS: dict[str, str] = {
    _SVD: "main",
    _SVD_XT: "main",
    _SVD_XT_1_1: "main",
    _TURBO: "main",
}

# Files the pipeline needs, by path in the repo. Everything else in the repo (fp32 weights, the original
# single-file checkpoints, README, images) is never downloaded.
_CONFIG_FILES = (
    "model_index.json",
    "feature_extractor/preprocessor_config.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "vae/config.json",
    "image_encoder/config.json",
)
_EXTRA_FOLDERS = ("feature_extractor", "scheduler")  # placed whole (they hold small config files only)
_WEIGHTS: dict[str, dict[str, str]] = {  # component -> precision -> path in the repo
    "unet": {
        "fp16": "unet/diffusion_pytorch_model.fp16.safetensors",
        "fp32": "unet/diffusion_pytorch_model.safetensors",
    },
    "vae": {
        "fp16": "vae/diffusion_pytorch_model.fp16.safetensors",
        "fp32": "vae/diffusion_pytorch_model.safetensors",
    },
    "image_encoder": {
        "fp16": "image_encoder/model.fp16.safetensors",
        "fp32": "image_encoder/model.safetensors",
    },
}
_VAE_PREFIX = "first_stage_model."  # VAE keys in Stability's single-file checkpoints (original LDM naming)
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_STAGING_PREFIX = ".bentosvd-staging-"


def hub_allow_patterns(variant: str) -> list[str]:
    """The `allow_patterns` given to `snapshot_download` for `variant` (fp16 diffusers files only)."""
    source = _source(variant)
    patterns = [
        "model_index.json",
        "feature_extractor/*",
        "scheduler/*",
        "unet/config.json",
        "vae/config.json",
        "image_encoder/config.json",
        _WEIGHTS["image_encoder"]["fp16"],
    ]
    if source.unet_file is None:  # else the UNet's weights come from source.unet_repo_id
        patterns.append(_WEIGHTS["unet"]["fp16"])
    if source.image_decoder_file is None:
        # The image-decoder variants replace the temporal VAE, so its weights are not fetched (only its
        # config, which gives sample_size / scaling_factor for the converted VAE).
        patterns.append(_WEIGHTS["vae"]["fp16"])
    return patterns


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


class DownloadError(RuntimeError):
    """The hub download failed for a reason the user can act on; the message says what to do."""


class MissingFilesError(FileNotFoundError):
    """A source directory (or downloaded snapshot) lacks files the variant needs."""

    def __init__(self, root: Path, variant: str, missing: list[str]):
        self.root = Path(root)
        self.variant = variant
        self.missing = list(missing)
        source = HUB_SOURCES[variant]
        unet = (f", and {source.unet_file} of https://huggingface.co/{source.unet_repo_id} there or"
                " named by --unet-from" if source.unet_file else "")
        super().__init__(
            f"{root} lacks {len(missing)} file(s) needed for variant {variant!r}:\n  - "
            + "\n  - ".join(missing)
            + f"\nExpected the file layout of https://huggingface.co/{source.repo_id}{unet} (for a git"
            " clone, run `git lfs pull` so the weights are real files, not LFS pointers)."
        )


class ConversionError(RuntimeError):
    """The single-file checkpoint's VAE could not be converted to a diffusers AutoencoderKL."""


# --------------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------------


def download_variant(
    variant: str,
    dest: Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: Path | None = None,
) -> dict:
    """Download `variant` from the Hugging Face Hub and lay it out under `dest` (see the module docstring).

    Only the fp16 diffusers files are fetched (configs, `*.fp16.safetensors` of unet / vae / image_encoder),
    never the fp32 weights or the original single-file checkpoints, except the one
    `*_image_decoder.safetensors` an image-decoder variant converts its VAE from.

    For the turbo variant, SVD-XT's files (less its UNet weights) and the UNet file of AnimateLCM-SVD-xt's
    repo as its authors publish it (fp32), cast to fp16 (`convert_unet_state_dict`).

    `revision`: branch, tag or commit; default `PINNED_REVISIONS[repo]` (for the turbo variant, of the UNet's
    repo; SVD-XT's is fetched at its pinned revision). `token`: None lets huggingface_hub
    use `HF_TOKEN` or the saved login. `endpoint`: None lets huggingface_hub use `HF_ENDPOINT` (else
    https://huggingface.co). `cache_dir`: the huggingface_hub cache to download into; None means its default
    (`HF_HUB_CACHE`, under `HF_HOME`).

    Downloads go through huggingface_hub's cache, which makes re-running safe and cheap: files already in
    the cache for that commit are not downloaded again (only the revision is looked up), and if the hub is
    unreachable a complete cached snapshot is used as is. Interrupted transfers: huggingface_hub resumes a
    dropped connection within the same call with an HTTP Range request from where it stopped; if the call
    itself fails or is killed, the files that finished are kept and the next call fetches only the rest
    (huggingface_hub 2.4 discards a partly written file, so that one file starts over).

    Files are hardlinked from the cache into `dest` (copied when that is not possible: another filesystem),
    so deleting the cache later does not break `dest`. `dest/pipeline` and `dest/image_encoder` are built
    in a staging folder inside `dest` and swapped in at the end; other entries of `dest` are left alone.

    Returns `{"variant", "repo_id", "revision" (the commit downloaded), "source": "hub", "decoder":
    "temporal" | "image", "weights": {"unet" | "vae" | "image_encoder": "fp16" | "fp32"}, "dtype":
    "float16" | "float32" | "mixed", "files": {path under dest (posix): sha256 hex}}`, and for the turbo
    variant `"unet": {"repo_id", "revision", "file", "sha256"}`: where its UNet came from.

    Raises `DownloadError` (licence not accepted / no or bad token, unknown repo or revision, hub not
    reachable, transfer failed, disk full) with a message saying what to do, `ConversionError` if the image-decoder
    checkpoint cannot be converted, `ValueError` for an unknown variant.
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    source = _source(variant)
    repo_id = source.repo_id
    # With the UNet from another repo, `revision` is that repo's (the variant's own weights).
    rev = PINNED_REVISIONS[repo_id] if source.unet_repo_id else revision or PINNED_REVISIONS[repo_id]
    where = dict(repo_id=repo_id, revision=rev, endpoint=endpoint, cache_dir=cache_dir)
    unet_file = unet_commit = None
    with warnings.catch_warnings():
        # huggingface_hub warns before a file that does not fit on the disk; the download then stops
        # with ENOSPC, which `download_error` turns into the one message (saying how much is free).
        warnings.filterwarnings("ignore", message="Not enough free disk space", category=UserWarning)
        try:
            snapshot = Path(
                snapshot_download(
                    repo_id,
                    revision=rev,
                    allow_patterns=hub_allow_patterns(variant),
                    cache_dir=cache_dir,
                    token=token,
                    endpoint=endpoint,
                )
            )
            # In the cache layout the snapshot folder is named after the commit it holds.
            commit = snapshot.name if _COMMIT_RE.match(snapshot.name) else None
            single_file = None
            if source.image_decoder_file is not None:
                single_file = Path(
                    hf_hub_download(
                        repo_id,
                        source.image_decoder_file,
                        revision=commit or rev,  # same commit as the snapshot
                        cache_dir=cache_dir,
                        token=token,
                        endpoint=endpoint,
                    )
                )
            if source.unet_file is not None:
                where.update(repo_id=source.unet_repo_id,
                             revision=revision or PINNED_REVISIONS[source.unet_repo_id])
                unet_file = Path(hf_hub_download(source.unet_repo_id, source.unet_file, revision=where["revision"],
                                                 cache_dir=cache_dir, token=token, endpoint=endpoint))
                unet_commit = unet_file.parent.name if _COMMIT_RE.match(unet_file.parent.name) else None
        except Exception as error:
            converted = download_error(error, **where)
            if converted is None:
                raise
            raise converted from error

    try:
        plan = _plan(snapshot, variant, allow_fp32=False, single_file=single_file, unet_file=unet_file)
    except MissingFilesError as error:
        raise DownloadError(
            f"{repo_id} at revision {rev!r} (commit {commit}) does not have the files BentoSVD needs:\n  - "
            + "\n  - ".join(error.missing)
            + "\nPick another revision, or use --from-dir with a local copy."
        ) from error
    files = _assemble(variant, snapshot, dest, plan)
    return _metadata(variant, commit, "hub", plan, files, unet_commit)


def copy_from_dir(variant: str, src: Path, dest: Path, unet_from: Path | None = None) -> dict:
    """Lay out `variant` under `dest` from `src`, a local directory with the repo's file layout.

    `src` may hold the fp16 files (`*.fp16.safetensors`) or the full-precision ones
    (`diffusion_pytorch_model.safetensors`, `model.safetensors`); fp16 is used where both are there and
    the choice is recorded per component in `"weights"`. For an image-decoder variant, `src` must also
    hold the single-file checkpoint (e.g. `svd_xt_image_decoder.safetensors`); its VAE is converted the
    same way as after a download (fp16 when the unet is fp16, else fp32). For the turbo variant, `src` is a
    copy of SVD-XT's repo and `unet_from` AnimateLCM-SVD-xt's UNet file, or a copy of its repo (default:
    `src`); the UNet is stored in the VAE's precision.

    Returns the same dict as `download_variant`, with `"source": "dir"` and `"revision"` the commit of the
    git checkout in `src` if it is one (else None). Raises `MissingFilesError` (a FileNotFoundError) listing
    every missing file, including git-lfs pointer files and truncated safetensors files.
    """
    source = _source(variant)
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"--from-dir: {src} is not a directory")
    single_file = src / source.image_decoder_file if source.image_decoder_file else None
    unet_file = None
    if source.unet_file is not None:
        unet_from = Path(unet_from or src)
        unet_file = unet_from / source.unet_file if unet_from.is_dir() else unet_from
    plan = _plan(src, variant, allow_fp32=True, single_file=single_file, unet_file=unet_file)
    files = _assemble(variant, src, dest, plan)
    return _metadata(variant, _git_head(src), "dir", plan, files, unet_file and _git_head(unet_file.parent))


# --------------------------------------------------------------------------------------------------------------
# Shared: check the source, place the files, convert
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    files: tuple[str, ...]  # paths in the repo to place (configs, extra folder files, weights)
    weights: dict[str, str]  # component -> "fp16" | "fp32"
    single_file: Path | None  # image-decoder checkpoint to convert the VAE from
    unet_file: Path | None = None  # the UNet's state dict, from another repo (HubSource.unet_file)


def _plan(root: Path, variant: str, *, allow_fp32: bool, single_file: Path | None,
          unet_file: Path | None = None) -> _Plan:
    """Decide which files of `root` to place; raise MissingFilesError listing everything missing."""
    image_decoder = HUB_SOURCES[variant].image_decoder_file is not None
    other_unet = HUB_SOURCES[variant].unet_file is not None
    missing: list[str] = []
    files: list[str] = []
    for rel in _CONFIG_FILES:
        if (root / rel).is_file():
            if not (image_decoder and rel == "vae/config.json"):  # replaced by the converted VAE's config
                files.append(rel)
        else:
            missing.append(rel)
    for folder in _EXTRA_FOLDERS:
        if (root / folder).is_dir():
            for path in sorted((root / folder).rglob("*")):
                rel = path.relative_to(root).as_posix()
                if path.is_file() and not _hidden(rel) and rel not in files:
                    files.append(rel)

    weights: dict[str, str] = {}
    for component, candidates in _WEIGHTS.items():
        if (component == "vae" and image_decoder) or (component == "unet" and other_unet):
            continue
        precisions = ("fp16", "fp32") if allow_fp32 else ("fp16",)
        problems = []
        for precision in precisions:
            problem = _weights_problem(root / candidates[precision])
            if problem is None:
                weights[component] = precision
                files.append(candidates[precision])
                break
            problems.append(f"{candidates[precision]} ({problem})")
        else:
            missing.append(" or ".join(problems))

    if image_decoder:
        if single_file is None:
            missing.append(HUB_SOURCES[variant].image_decoder_file)
        else:
            problem = _weights_problem(single_file)
            if problem is not None:
                missing.append(f"{single_file.name} ({problem})")
        weights["vae"] = "fp32" if weights.get("unet") == "fp32" else "fp16"

    if other_unet:
        name = HUB_SOURCES[variant].unet_file
        problem = "missing" if unet_file is None else _weights_problem(unet_file)
        if problem is not None:
            missing.append(f"{unet_file or name} ({problem})")
        weights["unet"] = weights.get("vae", "fp16")  # stored in the precision of the rest

    if missing:
        raise MissingFilesError(root, variant, missing)
    return _Plan(files=tuple(files), weights=weights, single_file=single_file if image_decoder else None,
                 unet_file=unet_file if other_unet else None)


def _assemble(variant: str, root: Path, dest: Path, plan: _Plan) -> dict[str, str]:
    """Place `plan.files` from `root` under `dest` (+ convert the VAE); return {path under dest: sha256}."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for stale in dest.glob(_STAGING_PREFIX + "*"):  # left over by a run that was killed
        shutil.rmtree(stale, ignore_errors=True)
    staging = dest / f"{_STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        for rel in plan.files:
            if rel == "model_index.json" and plan.single_file is not None:
                continue  # rewritten below
            _link_or_copy(root / rel, staging / _dest_path(rel))
        if plan.single_file is not None:
            index = json.loads((root / "model_index.json").read_text())
            index["vae"] = ["diffusers", "AutoencoderKL"]
            (staging / "pipeline").mkdir(parents=True, exist_ok=True)
            (staging / "pipeline" / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
            temporal_config = json.loads((root / "vae" / "config.json").read_text())
            convert_image_decoder_vae(
                plan.single_file,
                staging / "pipeline" / "vae",
                base_config=temporal_config,
                fp16=plan.weights["vae"] == "fp16",
            )
        if plan.unet_file is not None:
            config = json.loads((root / "unet" / "config.json").read_text())
            convert_unet_state_dict(plan.unet_file, config, staging / "pipeline" / "unet",
                                    fp16=plan.weights["unet"] == "fp16")
        _write_scheduler(variant, staging / "pipeline" / "scheduler")
        files = {
            path.relative_to(staging).as_posix(): sha256_file(path)
            for path in sorted(staging.rglob("*"))
            if path.is_file()
        }
        # Swap the finished folders in; anything else in dest (e.g. a BentoML model.yaml) is untouched.
        for name in ("pipeline", "image_encoder"):
            target = dest / name
            if target.exists() or target.is_symlink():
                old = staging / f"old-{name}"
                os.replace(target, old)
            os.replace(staging / name, target)
        return files
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def convert_image_decoder_vae(single_file: Path, out_dir: Path, *, base_config: dict | None = None, fp16: bool = True):
    """Convert the `first_stage_model.*` VAE of a Stability single-file checkpoint to a diffusers AutoencoderKL.

    Only the VAE tensors are read (`safetensors.safe_open`), not the whole multi-GB file. The architecture
    (block_out_channels, layers_per_block, latent channels, ...) is derived from the tensor shapes;
    sample_size / scaling_factor / force_upcast come from `base_config` (the repo's temporal vae/config.json)
    when given. The result is checked by a strict state-dict load, saved with `save_pretrained` (variant
    "fp16" when `fp16`), and re-loaded with `AutoencoderKL.from_pretrained` to confirm no key is missing or
    unexpected.
    """
    import torch
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors import safe_open

    single_file = Path(single_file)
    with safe_open(str(single_file), framework="pt") as f:
        keys = [k for k in f.keys() if k.startswith(_VAE_PREFIX)]
        if not keys:
            raise ConversionError(f"{single_file.name} has no {_VAE_PREFIX}* tensors: not an SVD image-decoder checkpoint")
        ldm = {k: f.get_tensor(k) for k in keys}

    stripped = {k[len(_VAE_PREFIX) :]: v for k, v in ldm.items()}
    config = _autoencoder_kl_config(stripped, base_config or {}, single_file.name)
    state = convert_ldm_vae_checkpoint(ldm, config)
    dtype = torch.float16 if fp16 else torch.float32
    state = {k: v.to(dtype).contiguous() for k, v in state.items() if v is not None}

    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    result = vae.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ConversionError(
            f"converting the VAE of {single_file.name} left keys missing {sorted(result.missing_keys)[:10]} "
            f"/ unexpected {sorted(result.unexpected_keys)[:10]}"
        )
    variant = "fp16" if fp16 else None
    out_dir = Path(out_dir)
    vae.save_pretrained(out_dir, variant=variant, safe_serialization=True)

    _, info = AutoencoderKL.from_pretrained(out_dir, variant=variant, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise ConversionError(f"the converted VAE of {single_file.name} does not re-load cleanly: {info}")
    return config


def convert_unet_state_dict(state_file: Path, config: dict, out_dir: Path, *, fp16: bool = True) -> None:
    """Place a whole `UNetSpatioTemporalConditionModel` state dict in diffusers' key names (AnimateLCM-SVD-xt's
    file, fp32) as `out_dir/diffusion_pytorch_model[.fp16].safetensors`, cast to fp16 when `fp16`.

    Checked as its authors load it (`load_state_dict(strict=True)` into the UNet of `config`, SVD-XT's
    unet/config.json), from the file's header before a tensor is read: every key of that UNet, no other, each
    of its shape. Tensors are read and cast one at a time; the cast copy (3 GB for the real file in fp16) is
    held until written.
    """
    import torch
    from diffusers import UNetSpatioTemporalConditionModel
    from safetensors import safe_open
    from safetensors.torch import save_file

    state_file = Path(state_file)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in UNetSpatioTemporalConditionModel.from_config(config).state_dict().items()}
    dtype = torch.float16 if fp16 else torch.float32
    with safe_open(str(state_file), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        problems = {
            "missing": sorted(expected.keys() - shapes.keys()),
            "unexpected": sorted(shapes.keys() - expected.keys()),
            "of another shape": [f"{k} {list(shapes[k])} (not {list(expected[k])})"
                                 for k in sorted(expected.keys() & shapes.keys()) if shapes[k] != expected[k]],
        }
        if any(problems.values()):
            raise ConversionError(f"{state_file.name} is not a state dict of SVD-XT's UNet: " + "; ".join(
                f"{len(keys)} keys {kind} (e.g. {', '.join(keys[:2])})" for kind, keys in problems.items() if keys))
        state = {k: f.get_tensor(k).to(dtype).contiguous() for k in expected}
    name = "diffusion_pytorch_model.fp16.safetensors" if fp16 else "diffusion_pytorch_model.safetensors"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / name), metadata={"format": "pt"})


def _write_scheduler(variant: str, folder: Path) -> None:
    """A variant whose sampler is not SVD's Euler (the turbo's) gets its own scheduler config in place of the
    repo's: the loader builds the class its `_class_name` names."""
    from bentosvd.config import VARIANTS

    sampler = VARIANTS[variant].sampler
    if sampler != "euler":
        from bentosvd.weights.random_weights import new_scheduler

        # Unlinked, not written over: they are hard links into the download cache or --from-dir.
        for stale in Path(folder).glob("*"):
            stale.unlink()
        new_scheduler(sampler).save_pretrained(folder)


def _autoencoder_kl_config(sd: dict, base: dict, name: str) -> dict:
    """AutoencoderKL config matching an LDM VAE state dict (keys without the `first_stage_model.` prefix)."""
    try:
        levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
        if levels != list(range(len(levels))) or not levels:
            raise KeyError("encoder.down.<i>")
        block_out_channels = [int(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in levels]
        layers_per_block = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
        config = {
            "in_channels": int(sd["encoder.conv_in.weight"].shape[1]),
            "out_channels": int(sd["decoder.conv_out.weight"].shape[0]),
            "down_block_types": ["DownEncoderBlock2D"] * len(levels),
            "up_block_types": ["UpDecoderBlock2D"] * len(levels),
            "block_out_channels": block_out_channels,
            "layers_per_block": layers_per_block,
            "act_fn": "silu",
            "latent_channels": int(sd["decoder.conv_in.weight"].shape[1]),
            "norm_num_groups": 32,
            "sample_size": int(base.get("sample_size", 768)),
            "scaling_factor": float(base.get("scaling_factor", 0.18215)),
            "force_upcast": bool(base.get("force_upcast", True)),
            "use_quant_conv": "quant_conv.weight" in sd,
            "use_post_quant_conv": "post_quant_conv.weight" in sd,
            "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd,
        }
    except (KeyError, IndexError, ValueError) as error:
        raise ConversionError(f"{name}: the {_VAE_PREFIX}* tensors do not look like an LDM AutoencoderKL ({error})") from error
    return config


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def sha256_file(path: Path, chunk_size: int = 8 * 1024 * 1024) -> str:
    """sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _source(variant: str) -> HubSource:
    try:
        return HUB_SOURCES[variant]
    except KeyError:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(HUB_SOURCES)}") from None


def _dest_path(rel: str) -> str:
    return rel if rel.startswith("image_encoder/") else f"pipeline/{rel}"


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hardlink `src` (through the cache's symlinks) to `dst`, or copy it when a link is not possible."""
    real = Path(os.path.realpath(src))
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(real, dst)
    except OSError:
        try:
            shutil.copyfile(real, dst)
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # shutil names the file read first: name the one that did not fit, on the disk that is full.
            raise OSError(error.errno, error.strerror, str(dst)) from error


def _weights_problem(path: Path) -> str | None:
    """None if `path` is a complete safetensors file, else why not (missing, LFS pointer, truncated)."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head.startswith(b"version "):
            return "a git-lfs pointer, not the file: run `git lfs pull`"
        if len(head) < 8:
            return "truncated"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100_000_000):  # safetensors caps its JSON header at 100 MB
            return "truncated or not a safetensors file"
        try:
            header = json.loads(f.read(header_len))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return "not a safetensors file"
    if 8 + header_len + end != size:
        return f"truncated or corrupt ({size} bytes, header says {8 + header_len + end})"
    return None


def _metadata(variant: str, revision: str | None, origin: str, plan: _Plan, files: dict[str, str],
              unet_revision: str | None = None) -> dict:
    source = HUB_SOURCES[variant]
    unet = {}
    if plan.unet_file is not None:
        unet = {"unet": {"repo_id": source.unet_repo_id, "revision": unet_revision, "file": plan.unet_file.name,
                         "sha256": sha256_file(plan.unet_file)}}
    return {
        "variant": variant,
        "repo_id": source.repo_id,
        "revision": revision,
        "source": origin,
        "decoder": "image" if source.image_decoder_file else "temporal",
        "weights": dict(plan.weights),
        "dtype": _dtype(plan.weights),
        "files": files,
        **unet,
    }


def _dtype(weights: dict[str, str]) -> str:
    """"float16" / "float32" when every component has that precision, else "mixed" (load them one by one)."""
    precisions = set(weights.values())
    if precisions == {"fp16"}:
        return "float16"
    if precisions == {"fp32"}:
        return "float32"
    return "mixed"


def _git_head(src: Path) -> str | None:
    """Commit checked out in `src` if it is the root of a git clone (best effort, no git binary needed)."""
    git = src / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if _COMMIT_RE.match(head):
            return head
        if head.startswith("ref: "):
            ref = head[5:]
            if (git / ref).is_file():
                return (git / ref).read_text().strip() or None
            packed = git / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    parts = line.split()
                    if len(parts) == 2 and parts[1] == ref:
                        return parts[0]
    except OSError:
        pass
    return src.name if _COMMIT_RE.match(src.name) else None  # a copied snapshots/<commit> folder


def download_error(error: Exception, *, repo_id: str, revision: str, endpoint: str | None, cache_dir) -> DownloadError | None:
    """Turn a huggingface_hub / network exception into a DownloadError that says what to do (None: not ours)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        import httpx2

        transport_errors: tuple[type[BaseException], ...] = (httpx2.TransportError,)
    except ImportError:  # pragma: no cover - huggingface_hub 2.x depends on httpx2
        transport_errors = ()

    hub = (endpoint or constants.ENDPOINT).rstrip("/")
    licence = f"https://huggingface.co/{repo_id}"
    status = None
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
    retry = (
        "Re-run the same command to continue: files that finished downloading are kept in the huggingface_hub"
        f" cache ({cache_dir or constants.HF_HUB_CACHE}) and are not fetched again."
    )

    full = disk_full(error)
    if full is not None:
        cache = Path(cache_dir or constants.HF_HUB_CACHE)
        return DownloadError(
            f"The disk is full: downloading {repo_id} into the huggingface_hub cache ({cache}) stopped with "
            f"'{full.strerror}'; {_free_space(cache)} free there now. Free some space on that disk and re-run the "
            "same command: files that finished downloading are kept there and are not fetched again. Or set "
            "HF_HOME to a folder on a bigger disk (the download then starts over there)."
        )
    if isinstance(error, GatedRepoError) or status in (401, 403):
        server_says = ""
        if isinstance(error, HfHubHTTPError) and error.response is not None:
            server_says = error.response.headers.get("X-Error-Message") or ""
        if status == 401 and "Invalid credentials" in server_says:
            why = "the token sent was rejected as invalid (expired, revoked or mistyped)"
        elif status == 403:
            why = "the account of the token sent has not been granted access (licence not accepted yet?)"
        else:
            why = "no token was sent, or it does not grant access"
        return DownloadError(
            f"Access to the gated repo {repo_id} on {hub} was refused (HTTP {status}): {why}. "
            f"Log in at {licence} and accept the model licence there, then create a read token at "
            "https://huggingface.co/settings/tokens and set HF_TOKEN=<token> (or pass the token explicitly)."
        )
    if isinstance(error, RevisionNotFoundError):
        return DownloadError(
            f"Revision {revision!r} was not found in {repo_id} on {hub} (HTTP {status}). "
            f"Use a branch, tag or full commit hash that exists there (default: {PINNED_REVISIONS.get(repo_id)!r})."
        )
    if isinstance(error, RepositoryNotFoundError):
        return DownloadError(
            f"Repository {repo_id} was not found on {hub} (HTTP {status}). Check the endpoint (HF_ENDPOINT) "
            f"and that the repo still exists at {licence}."
        )
    if isinstance(error, RemoteEntryNotFoundError):
        return DownloadError(f"A file was not found in {repo_id} at revision {revision!r} on {hub}: {error}")
    if isinstance(error, LocalEntryNotFoundError) or isinstance(error, (OfflineModeIsEnabled, *transport_errors)):
        if constants.is_offline_mode():
            why = "HF_HUB_OFFLINE is set, and the files are not all in the local cache"
        else:
            cause = error.__cause__ or error.__context__ or error
            why = f"{type(cause).__name__}: {cause}".strip()
        message = (
            f"Could not download {repo_id} (revision {revision!r}): the hub at {hub} could not be reached ({why}). "
            "Check the network, proxy settings (HTTPS_PROXY) and HF_ENDPOINT and try again, or fetch the repo on "
            f"another machine (git clone {licence} with git-lfs) and install it with `--from-dir <that folder>`."
        )
        if isinstance(error, transport_errors):  # lost during a transfer: some files may already be cached
            message += " " + retry
        return DownloadError(message)
    if isinstance(error, HfHubHTTPError):
        return DownloadError(f"The hub at {hub} answered HTTP {status} while downloading {repo_id}: {error}. {retry}")
    if isinstance(error, OSError):  # e.g. the size check after a broken transfer
        return DownloadError(f"Downloading {repo_id} failed: {error}. {retry}")
    return None


def disk_full(error: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT error behind `error` (itself, or what it was raised from), if any.
    BentoML's copy into the model store re-raises a full disk as an OSError without its
    errno: its text is what says so."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and (error.errno in (errno.ENOSPC, errno.EDQUOT)
                                           or "[Errno 28]" in str(error)):
            return error
        error = error.__cause__ or error.__context__
    return None


def _free_space(path: Path) -> str:
    """Free space on the disk holding `path` (or its nearest existing parent), e.g. "1.2 MB"."""
    for folder in (Path(path), *Path(path).parents):
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            continue
        return f"{free / 1e9:.1f} GB" if free >= 1e9 else f"{free / 1e6:.1f} MB"
    return "an unknown amount"
