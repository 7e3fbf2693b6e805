"""Register an SVD variant and its CLIP image encoder in the BentoML model store.

    MODEL_VERSION=svd_xt python import_model.py           # from the Hugging Face hub (HF_TOKEN)
    python import_model.py --variant svd --from-dir DIR   # from a local copy of the repo
    python import_model.py --variant demo                 # tiny random weights, no download
    python import_model.py --variant svd_xt --synthetic   # full size, random weights (benchmarks)

Re-running is safe: a model with the same files is not registered twice.
"""

from __future__ import annotations

import argparse
import errno
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

    frames = VARIANTS[variant_name].num_frames
    if synthetic:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        parts = build_synthetic(frames, device=device, dtype=torch.float16)
        source, dtype = "synthetic", "float16"
    else:
        parts = build_demo(frames)
        source, dtype = DEMO_BUILD, "float32"
    save_parts(parts, dest / "pipeline", dest / "image_encoder", fp16_files=synthetic)
    return {"source": source, "revision": source, "dtype": dtype}


def stage_real(variant_name: str, dest: Path, args: argparse.Namespace) -> dict:
    from bentosvd.weights import hub

    if args.from_dir:
        info = hub.copy_from_dir(variant_name, Path(args.from_dir), dest)
        source = f"dir:{Path(args.from_dir).resolve()}"
    else:
        info = hub.download_variant(variant_name, dest, revision=args.revision, token=args.token)
        source = f"hf:{info['repo_id']}"
    return {"source": source, "revision": info["revision"] or "unknown", "dtype": info["dtype"]}


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
    from bentosvd.weights.hub import DownloadError
    from bentosvd.weights.store import MissingModel

    if isinstance(error, (DownloadError, MissingModel)):
        return str(error)
    if isinstance(error, ValidationError):  # a setting such as MODEL_VERSION out of range
        return f"a setting is invalid: {error}"
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" writing {error.filename}" if error.filename else ""
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
    source.add_argument("--synthetic", action="store_true",
                        help="full-size architecture with random weights (for benchmarks)")
    parser.add_argument("--revision", default=None, help="hub revision (default: the pinned one)")
    parser.add_argument("--token", default=os.environ.get("HF_TOKEN"),
                        help="Hugging Face token (default: $HF_TOKEN)")
    parser.add_argument("--if-missing", action="store_true",
                        help="do nothing if the variant is already registered (make serve)")
    parser.add_argument("--debug", action="store_true",
                        help=f"on a failure, show the traceback too (also: {DEBUG_ENV}=1)")
    return parser


def _import(args: argparse.Namespace) -> int:
    from bentosvd.weights.store import MissingModel, find_models, register_variant

    variant = VARIANTS[args.variant or Settings().model_version]
    if args.if_missing and not args.synthetic:
        try:
            variant_tag, encoder_tag = find_models(Settings(model_version=variant.name))
        except MissingModel:
            pass
        else:
            print(f"{variant_tag} (with {encoder_tag}) is registered already")
            return 0
    if variant.name == "demo" and (args.from_dir or args.synthetic):
        _parser().error("the demo variant is built in code: drop --from-dir / --synthetic")
    with tempfile.TemporaryDirectory(prefix="bentosvd-import-") as tmp:
        staged = Path(tmp)
        if variant.name == "demo" or args.synthetic:
            info = stage_random(variant.name, staged, args.synthetic)
        else:
            info = stage_real(variant.name, staged, args)
        variant_tag, encoder_tag = register_variant(
            variant, staged, sha256_tree(staged), synthetic=args.synthetic, **info
        )
    serve_env = f"MODEL_TAG={variant_tag} " if args.synthetic else ""
    print(f"\n{variant_tag} uses {encoder_tag}. Serve it with:\n"
          f"  {serve_env}MODEL_VERSION={variant.name} bentoml serve service:svc")
    return 0
