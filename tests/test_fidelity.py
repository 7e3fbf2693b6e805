"""The service's video is exactly what a direct diffusers call makes from the same stored
parts, with the parameters mapped as DESIGN.md §2 says (fps = fps_id + 1,
noise_aug_strength = cond_aug, decode_chunk_size = decoding_t, seeded generator)."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from bentosvd.config import VARIANTS, Settings
from bentosvd.media.images import decode_upload
from bentosvd.media.video import encode_mp4
from bentosvd.protocol import GenerationSettings
from bentosvd.svd.generator import VideoGenerator

DEMO = VARIANTS["demo"]
PARAMS = {"fps_id": 5, "motion_bucket_id": 200, "cond_aug": 0.05, "decoding_t": 3, "seed": 42}


@pytest.fixture(scope="module")
def stored(bentoml_home):
    """Folders of the demo model and its encoder as import_model.py stored them."""
    (pipeline_dir,) = (bentoml_home / "models" / DEMO.store_name).glob("*/pipeline")
    (encoder_dir,) = (bentoml_home / "models" / DEMO.image_encoder_name).glob("*/image_encoder")
    return pipeline_dir, encoder_dir


@pytest.fixture(scope="module")
def reference_frames(stored, test_image) -> np.ndarray:
    """A plain diffusers call, written as its documentation shows, on the stored parts."""
    pipeline_dir, encoder_dir = stored
    pipe = StableVideoDiffusionPipeline(
        unet=UNetSpatioTemporalConditionModel.from_pretrained(pipeline_dir / "unet"),
        vae=AutoencoderKLTemporalDecoder.from_pretrained(pipeline_dir / "vae"),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoder_dir),
        scheduler=EulerDiscreteScheduler.from_pretrained(pipeline_dir / "scheduler"),
        feature_extractor=CLIPImageProcessor.from_pretrained(pipeline_dir / "feature_extractor"),
    )
    image = Image.fromarray(decode_upload(test_image, (DEMO.width, DEMO.height)))
    frames = pipe(
        image, height=DEMO.height, width=DEMO.width, num_frames=DEMO.num_frames,
        num_inference_steps=DEMO.num_inference_steps, min_guidance_scale=DEMO.min_guidance_scale,
        max_guidance_scale=DEMO.max_guidance_scale, fps=PARAMS["fps_id"] + 1,
        motion_bucket_id=PARAMS["motion_bucket_id"], noise_aug_strength=PARAMS["cond_aug"],
        decode_chunk_size=PARAMS["decoding_t"],
        generator=torch.Generator("cpu").manual_seed(PARAMS["seed"]), output_type="np",
    ).frames[0]
    return (frames * 255).round().astype(np.uint8)


def test_generator_frames_equal_direct_diffusers_call(stored, test_image, reference_frames):
    generator = VideoGenerator.load(*stored, device="cpu")
    frames = generator.generate(
        decode_upload(test_image, (DEMO.width, DEMO.height)),
        GenerationSettings(
            num_frames=DEMO.num_frames, num_inference_steps=DEMO.num_inference_steps,
            min_guidance_scale=DEMO.min_guidance_scale, max_guidance_scale=DEMO.max_guidance_scale,
            fps=PARAMS["fps_id"] + 1, motion_bucket_id=PARAMS["motion_bucket_id"],
            noise_aug_strength=PARAMS["cond_aug"], decode_chunk_size=PARAMS["decoding_t"],
            seed=PARAMS["seed"],
        ),
    )
    assert frames.shape == (DEMO.num_frames, DEMO.height, DEMO.width, 3)
    assert np.array_equal(frames, reference_frames)
    assert frames.std() > 0  # not a blank video


def test_server_video_equals_direct_call_encoded(server, test_image, reference_frames):
    """Same frames in, same encoder settings: the server's MP4 is byte-identical."""
    with test_image.open("rb") as f:
        response = httpx.post(f"{server.url}/generate", files={"img": f},
                              data={"params": json.dumps(PARAMS)}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.content == encode_mp4(reference_frames, PARAMS["fps_id"] + 1,
                                         crf=Settings().video_crf)
