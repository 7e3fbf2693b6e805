"""RIFE in the BentoML model store: registered like SVD (a file, a hub repo's file, or
random weights for the demo and the benchmark), found again by the worker and the API.

A RIFE model is the model `rife` with one file, `flownet.pkl` (an IFNet state dict, as the
authors publish it), and the labels `version` (4.5-4.9, read from the weights), `source`,
`revision` and `sha256`. Registering the same file twice is free.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import bentoml
from bentoml.exceptions import NotFound

class BadRifeWeights(ValueError):
    """The file is not RIFE 4.5-4.9 IFNet weights; the message says what is wrong."""


STORE_NAME = "rife"
WEIGHTS_FILE = "flownet.pkl"
RANDOM_BUILD = "random-v1"  # bump when bentosvd.rife.ifnet.build_random changes


def register_file(path: Path, *, source: str, revision: str = "") -> str:
    """Check that `path` holds RIFE 4.5-4.9 IFNet weights (ValueError saying what is wrong
    if not) and register it; the model's tag."""
    from bentosvd.rife.ifnet import load_ifnet
    from bentosvd.weights.hub import sha256_file

    try:
        model = load_ifnet(path)
    except (ValueError, OSError, RuntimeError) as e:  # not weights, or not RIFE's
        raise BadRifeWeights(f"{path} cannot be registered as RIFE: {e}. Give the authors' "
                             "flownet.pkl of RIFE 4.5-4.9 (Practical-RIFE's train_log/), or "
                             "ComfyUI's rife47.pth / rife49.pth.") from e
    digest = sha256_file(path)
    labels = {"version": model.version, "source": source, "revision": revision or "none",
              "sha256": digest}
    for existing in _registered():
        if existing.info.labels.get("sha256") == digest and existing.info.labels.get("source") == source:
            print(f"{existing.tag} is already registered with this file")
            return str(existing.tag)
    with bentoml.models.create(STORE_NAME, labels=labels,
                               metadata={"widths": list(model.widths)}) as stored:
        shutil.copyfile(path, Path(stored.path) / WEIGHTS_FILE)
    print(f"registered {stored.tag} (RIFE {model.version} from {source})")
    return str(stored.tag)


def register_random(size: str) -> str:
    """Random weights, `demo` (tiny, for CPU tests and `make serve`) or `full` (the
    authors' size, for GPU timings): no download."""
    import torch

    from bentosvd.rife.ifnet import build_random

    with tempfile.TemporaryDirectory(prefix="bentosvd-rife-") as tmp:
        path = Path(tmp) / WEIGHTS_FILE
        torch.save(build_random(size).state_dict(), path)
        return register_file(path, source=f"random:{size}", revision=RANDOM_BUILD)


def register_from_hub(repo_id: str, filename: str, *, revision: str | None = None,
                      token: str | None = None, endpoint: str | None = None) -> str:
    """Download `filename` of the hub repo `repo_id` and register it, with the commit it
    came from. Raises hub.DownloadError with what to do when it cannot be fetched."""
    from huggingface_hub import hf_hub_download

    from bentosvd.weights.hub import download_error

    rev = revision or "main"
    try:
        path = Path(hf_hub_download(repo_id, filename, revision=rev, token=token,
                                    endpoint=endpoint))
    except Exception as error:
        converted = download_error(error, repo_id=repo_id, revision=rev, endpoint=endpoint,
                                    cache_dir=None)
        if converted is None:
            raise
        raise converted from error
    # The cache keeps each file under snapshots/<commit>/.
    commit = next((p.name for p in path.parents if p.parent.name == "snapshots"), rev)
    return register_file(path, source=f"hf:{repo_id}/{filename}", revision=commit)


def find(tag: str) -> bentoml.Model | None:
    """The registered RIFE model `tag` (`rife` for the latest), or None if there is none."""
    if not tag or tag == "none":
        return None
    try:
        return bentoml.models.get(tag)
    except NotFound:
        return None


def load(stored_path: str | Path, device, dtype):
    """The IFNet of a registered model folder, on `device` in `dtype`."""
    from bentosvd.rife.ifnet import load_ifnet

    return load_ifnet(Path(stored_path) / WEIGHTS_FILE).to(device=device, dtype=dtype)


def _registered() -> list[bentoml.Model]:
    try:
        return list(bentoml.models.list(STORE_NAME))
    except NotFound:
        return []


__all__ = ["BadRifeWeights", "STORE_NAME", "find", "load", "register_file", "register_from_hub", "register_random"]
