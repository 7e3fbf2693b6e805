"""The BentoML model store side of BentoSVD: registering a variant and finding it again.

A variant is two models: its own (`svd`, `svd_xt`, … with the folder `pipeline/`: UNet,
VAE, scheduler, feature extractor) and the CLIP image encoder it was registered with
(`clip-vit-h-14-laion`, folder `image_encoder/`), shared by all real variants. The
variant's label `image_encoder` names the exact encoder tag, so the two always match.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import bentoml
from bentoml.exceptions import NotFound

from bentosvd.config import SYNTHETIC_SUFFIX, Settings, Variant


class MissingModel(RuntimeError):
    """The model to serve is not in the model store."""


def import_command(settings: Settings) -> str:
    if settings.model_tag and settings.model_tag.split(":")[0].endswith(SYNTHETIC_SUFFIX):
        return f"python import_model.py --variant {settings.model_version} --synthetic"
    return f"MODEL_VERSION={settings.model_version} python import_model.py"


def find_models(settings: Settings) -> tuple[str, str]:
    """(variant tag, image encoder tag) to serve, both with exact versions."""
    tag = settings.variant_tag
    try:
        model = bentoml.models.get(tag)
        encoder = bentoml.models.get(model.info.labels["image_encoder"])
    except (NotFound, KeyError) as e:
        raise MissingModel(
            f"model {tag!r} (or the image encoder registered with it) is not in the BentoML "
            f"model store under {_bentoml_home()}: register it first with "
            f"`{import_command(settings)}` ({e})"
        ) from None
    return str(model.tag), str(encoder.tag)


def _bentoml_home() -> str:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return str(BentoMLContainer.bentoml_home.get())


def _find_same(name: str, files: dict[str, str], labels: dict[str, str]) -> bentoml.Model | None:
    """An already registered model with these exact files and labels (re-running is free)."""
    try:
        candidates = bentoml.models.list(name)
    except NotFound:
        return None
    for model in candidates:
        if model.info.metadata.get("files") == files and all(
            model.info.labels.get(k) == v for k, v in labels.items()
        ):
            return model
    return None


def _register(name: str, folder: Path, subdir: str, files: dict[str, str],
              labels: dict[str, str], metadata: dict) -> str:
    same = _find_same(name, files, labels)
    if same is not None:
        print(f"{same.tag} is already registered with these files")
        return str(same.tag)
    with bentoml.models.create(name, labels=labels, metadata={**metadata, "files": files}) as model:
        shutil.copytree(folder, Path(model.path) / subdir)
    print(f"registered {model.tag}")
    return str(model.tag)


def register_variant(variant: Variant, staged: Path, files: dict[str, str], *, source: str,
                     revision: str, dtype: str, synthetic: bool = False,
                     variant_labels: dict[str, str] | None = None) -> tuple[str, str]:
    """Register `staged/pipeline` as the variant and `staged/image_encoder` as its encoder.

    `files` maps paths relative to `staged` to sha256 digests; `variant_labels` label the
    variant only (where the turbo's UNet came from). Returns both tags.
    """
    suffix = SYNTHETIC_SUFFIX if synthetic else ""
    common = {"source": source, "revision": revision, "dtype": dtype}
    encoder_tag = _register(
        variant.image_encoder_name + suffix, staged / "image_encoder", "image_encoder",
        {k: v for k, v in files.items() if k.startswith("image_encoder/")}, common, {},
    )
    variant_tag = _register(
        variant.store_name + suffix, staged / "pipeline", "pipeline",
        {k: v for k, v in files.items() if k.startswith("pipeline/")},
        {**common, **(variant_labels or {}), "variant": variant.name, "image_encoder": encoder_tag},
        {"description": variant.description, "num_frames": variant.num_frames},
    )
    return variant_tag, encoder_tag
