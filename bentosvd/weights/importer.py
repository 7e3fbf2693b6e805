"""Register an SVD variant and its CLIP image encoder in the BentoML model store.

    MODEL_VERSION=svd_xt python import_model.py           # from the Hugging Face hub (HF_TOKEN)
    python import_model.py --variant svd --from-dir DIR   # from a local copy of the repo
    python import_model.py --variant svd_xt_turbo         # AnimateLCM-SVD-xt's UNet + SVD-XT's VAE, encoder
    python import_model.py --variant demo                 # tiny random weights, no download
    python import_model.py --variant svd_xt --synthetic   # full size, random weights (benchmarks)
    python import_model.py --rife-file flownet.pkl        # RIFE 4.5-4.9 for frame interpolation
    python import_model.py --rife-hub REPO FILE           # the same, a file from a hub repo

The demo (and --synthetic) also register a RIFE with random weights (--no-rife: not).

Re-running is safe: a model with the same files is not registered twice.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError

from bentosvd.config import VARIANTS, Settings

DEMO_BUILD = "demo-v1"  # bump when bentosvd.weights.random_weights.build_demo changes


def sha256_tree(root: Path) -> dict[str, str]:
    """sha256 of every file below `root`, keyed by its path relative to `root`."""
    from bentosvd.weights.hub import sha256_file

    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file()}


def stage_random(variant_name: str, dest: Path, synthetic: bool) -> dict:
    """Build the demo or synthetic parts in code and save them in the store's layout."""
    import torch

    from bentosvd.svd.loading import save_parts
    from bentosvd.weights.random_weights import build_demo, build_synthetic

    frames, sampler = VARIANTS[variant_name].num_frames, VARIANTS[variant_name].sampler
    if synthetic:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        parts = build_synthetic(frames, device=device, dtype=torch.float16, sampler=sampler)
        source, dtype = "synthetic", "float16"
    else:
        parts = build_demo(frames, sampler=sampler)
        source, dtype = DEMO_BUILD, "float32"
    save_parts(parts, dest / "pipeline", dest / "image_encoder", fp16_files=synthetic)
    return {"source": source, "revision": source, "dtype": dtype}


def stage_real(variant_name: str, dest: Path, args: argparse.Namespace) -> dict:
    from bentosvd.weights import hub

    if args.from_dir:
        info = hub.copy_from_dir(variant_name, Path(args.from_dir), dest, args.unet_from)
        source = f"dir:{Path(args.from_dir).resolve()}"
    else:
        info = hub.download_variant(variant_name, dest, revision=args.revision, token=args.token)
        source = f"hf:{info['repo_id']}"
    staged = {"source": source, "revision": info["revision"] or "unknown", "dtype": info["dtype"]}
    if "unet" in info:  # the turbo's UNet, from its authors' repo: labelled on the variant only
        unet = info["unet"]
        origin = (f"dir:{Path(args.unet_from or args.from_dir).resolve()}" if args.from_dir
                  else f"hf:{unet['repo_id']}")
        staged["variant_labels"] = {"unet_source": origin, "unet_file": unet["file"],
                                    "unet_revision": unet["revision"] or "unknown",
                                    "unet_sha256": unet["sha256"]}
    return staged


DEBUG_ENV = "BENTOSVD_DEBUG"  # set (or --debug): a failure shows its traceback too


def main(argv: list[str] | None = None) -> int:
    """The command: 0 once registered; on a failure the user can act on (the hub, the
    network, the disk), one paragraph on stderr and 1, the traceback only with --debug."""
    args = _parser().parse_args(argv)
    try:
        return _import(args)
    except Exception as e:
        problem = explain(e)
        if problem is None or args.debug or os.environ.get(DEBUG_ENV):
            raise
        print(f"import_model.py: {problem}\n(--debug or {DEBUG_ENV}=1 shows the traceback)",
              file=sys.stderr)
        return 1


def explain(error: Exception) -> str | None:
    """The one paragraph for a failure the user can act on; None for a bug."""
    from bentosvd.weights.hub import ConversionError, DownloadError, MissingFilesError, disk_full
    from bentosvd.weights.rife_models import BadRifeWeights
    from bentosvd.weights.store import MissingModel

    if isinstance(error, (DownloadError, MissingModel, MissingFilesError, ConversionError,
                          BadRifeWeights)):
        return str(error)
    if isinstance(error, ValidationError):  # a setting such as MODEL_VERSION out of range
        return f"a setting is invalid: {error}"
    full = disk_full(error)
    if full is not None:
        where = f" writing {full.filename}" if full.filename else ""
        return (f"the disk is full{where}. Free some space, or point HF_HOME (the download "
                "cache) and TMPDIR (the staging folder) at a bigger disk, then re-run the same "
                "command: files that finished downloading are kept.")
    return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default=None,
                        help="variant to register (default: $MODEL_VERSION, else svd)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--from-dir", metavar="DIR", help="a local copy of the variant's repo")
    parser.add_argument("--unet-from", metavar="PATH", help="svd_xt_turbo with --from-dir (a copy of "
                        "SVD-XT's repo): AnimateLCM-SVD-xt's UNet file or a copy of its repo "
                        "(default: in --from-dir)")
    source.add_argument("--synthetic", action="store_true",
                        help="full-size architecture with random weights (for benchmarks)")
    parser.add_argument("--revision", default=None, help="hub revision (default: the pinned one)")
    parser.add_argument("--token", default=os.environ.get("HF_TOKEN"),
                        help="Hugging Face token (default: $HF_TOKEN)")
    parser.add_argument("--if-missing", action="store_true",
                        help="do nothing if the variant is already registered (make serve)")
    rife = parser.add_argument_group("RIFE, for frame interpolation (registers only it)")
    rife_source = rife.add_mutually_exclusive_group()
    rife_source.add_argument("--rife-file", metavar="PATH",
                             help="RIFE 4.5-4.9 IFNet weights (the authors' flownet.pkl)")
    rife_source.add_argument("--rife-hub", nargs=2, metavar=("REPO", "FILE"),
                             help="the same, FILE of the hub repo REPO (--revision, --token apply)")
    rife.add_argument("--no-rife", action="store_true",
                      help="with the demo or --synthetic: do not register a random RIFE")
    parser.add_argument("--debug", action="store_true",
                        help=f"on a failure, show the traceback too (also: {DEBUG_ENV}=1)")
    return parser


def _import(args: argparse.Namespace) -> int:
    from bentosvd.weights.store import MissingModel, find_models, register_variant

    from bentosvd.weights import rife_models

    if args.rife_file:
        rife_models.register_file(Path(args.rife_file), source=f"file:{Path(args.rife_file).resolve()}")
        return 0
    if args.rife_hub:
        rife_models.register_from_hub(*args.rife_hub, revision=args.revision, token=args.token)
        return 0
    variant = VARIANTS[args.variant or Settings().model_version]
    random_rife = None if args.no_rife else "full" if args.synthetic else "demo" if variant.demo else None
    if args.if_missing and not args.synthetic:
        try:
            variant_tag, encoder_tag = find_models(Settings(model_version=variant.name))
        except MissingModel:
            pass
        else:
            print(f"{variant_tag} (with {encoder_tag}) is registered already")
            if random_rife and rife_models.find(rife_models.STORE_NAME) is None:
                rife_models.register_random(random_rife)
            return 0
    if variant.demo and (args.from_dir or args.synthetic):
        _parser().error("the demo variant is built in code: drop --from-dir / --synthetic")
    if args.unet_from and (variant.demo or variant.sampler == "euler" or not args.from_dir):
        _parser().error("--unet-from goes with --from-dir, for svd_xt_turbo")
    with tempfile.TemporaryDirectory(prefix="bentosvd-import-") as tmp:
        staged = Path(tmp)
        if variant.demo or args.synthetic:
            info = stage_random(variant.name, staged, args.synthetic)
        else:
            info = stage_real(variant.name, staged, args)
        variant_tag, encoder_tag = register_variant(
            variant, staged, sha256_tree(staged), synthetic=args.synthetic, **info
        )
    if random_rife:
        rife_models.register_random(random_rife)
    serve_env = f"MODEL_TAG={variant_tag} " if args.synthetic else ""
    print(f"\n{variant_tag} uses {encoder_tag}. Serve it with:\n"
          f"  {serve_env}MODEL_VERSION={variant.name} bentoml serve service:svc")
    return 0
