"""Every setting, limit and default of BentoSVD, in one place.

`Settings` is read from the environment (upper-case names, e.g. `MODEL_VERSION=svd_xt`);
`VARIANTS` holds each model variant's reference defaults; `Params` is the request schema
of `POST /generate`, whose bounds the service, the docs and the tests all read from here.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bentosvd.media.formats import FORMATS, MAX_INTERPOLATED_FPS, X264_PRESETS
from bentosvd.svd.speedups import step_cache_problem

VariantName = Literal["svd", "svd_xt", "svd_image_decoder", "svd_xt_image_decoder", "svd_xt_1_1",
                      "svd_xt_turbo", "demo", "demo_turbo"]

# Seeds stay within JavaScript's safe integers so a seed shown in a browser or JSON
# client round-trips exactly.
MAX_SEED = 2**53 - 1
MAX_FRAMES = 25  # the largest variant's (SVD-XT); each model allows up to its own count
MAX_STEPS = 50
MAX_GUIDANCE = 10.0


class Variant(BaseModel):
    """A model variant and its authors' defaults: Stability's reference scripts for SVD,
    AnimateLCM's for the turbo variants."""

    model_config = ConfigDict(frozen=True)

    name: str
    store_name: str  # name of the variant's model in the BentoML model store
    image_encoder_name: str  # name of the image encoder's model in the store
    num_frames: int
    num_inference_steps: int
    min_guidance_scale: float
    max_guidance_scale: float
    width: int  # landscape size; portrait images get (height, width)
    height: int
    frame_decoder: Literal["temporal", "image"]
    description: str
    max_inference_steps: int = MAX_STEPS  # a request's num_inference_steps at most
    motion_bucket_id: int = 127  # a request's default motion
    # How the latents are denoised: SVD's Euler scheduler, or AnimateLCM-SVD-xt's
    # consistency sampler (bentosvd/svd/turbo_sampler.py), whose few steps need no guidance.
    sampler: Literal["euler", "animatelcm"] = "euler"
    demo: bool = False  # tiny random weights built in code: the video is noise


_SVD = dict(num_frames=14, num_inference_steps=25, min_guidance_scale=1.0, max_guidance_scale=2.5)
_SVD_XT = dict(num_frames=25, num_inference_steps=30, min_guidance_scale=1.5, max_guidance_scale=3.0)
_REAL = dict(width=1024, height=576, image_encoder_name="clip-vit-h-14-laion")
# AnimateLCM-SVD-xt's authors' defaults: 4 steps (1-8), no classifier-free guidance, motion
# 80, fps conditioning 7 (fps_id 6). TURBO_DEFAULTS in bentosvd/svd/turbo_sampler.py gives
# their sources; a test keeps the two equal (this module imports no torch).
_TURBO = dict(sampler="animatelcm", num_inference_steps=4, max_inference_steps=8,
              min_guidance_scale=1.0, max_guidance_scale=1.0, motion_bucket_id=80)
# The demo: 4 frames, so that the test suite's hundreds of generations on the CPU cost half
# of what 8 did; any larger count only makes more noise.
_DEMO = dict(demo=True, image_encoder_name="clip-demo", frame_decoder="temporal", num_frames=4,
             width=256, height=144)

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant(name="svd", store_name="svd", frame_decoder="temporal", **_SVD, **_REAL,
                description="SVD, 14 frames, temporal VAE decoder"),
        Variant(name="svd_image_decoder", store_name="svd_image_decoder", frame_decoder="image",
                **_SVD, **_REAL, description="SVD, 14 frames, frame-wise VAE decoder"),
        Variant(name="svd_xt", store_name="svd_xt", frame_decoder="temporal", **_SVD_XT, **_REAL,
                description="SVD-XT, 25 frames, temporal VAE decoder"),
        Variant(name="svd_xt_image_decoder", store_name="svd_xt_image_decoder",
                frame_decoder="image", **_SVD_XT, **_REAL,
                description="SVD-XT, 25 frames, frame-wise VAE decoder"),
        Variant(name="svd_xt_1_1", store_name="svd_xt_1_1", frame_decoder="temporal", **_SVD_XT,
                **_REAL, description="SVD-XT 1.1, 25 frames; fine-tuned at fps_id 6, motion 127"),
        Variant(name="svd_xt_turbo", store_name="svd_xt_turbo", frame_decoder="temporal",
                num_frames=25, **_TURBO, **_REAL,
                description="AnimateLCM-SVD-xt: SVD-XT distilled to 1-8 steps without guidance; "
                "its videos differ from SVD-XT's"),
        # Tiny random weights built in code: runs anywhere in seconds, makes noise.
        Variant(name="demo", store_name="svd_demo", num_inference_steps=4, min_guidance_scale=1.0,
                max_guidance_scale=2.5, **_DEMO,
                description="demo: tiny random weights, output is noise"),
        Variant(name="demo_turbo", store_name="svd_demo_turbo", **_TURBO, **_DEMO,
                description="demo of svd_xt_turbo's sampler: tiny random weights, output is noise"),
    ]
}

DEMO_WARNING = "demo model: tiny random weights, the video is noise"
SYNTHETIC_SUFFIX = "-synthetic"  # store names of full-size random-weight models (benchmarks)


class Settings(BaseSettings):
    """Server settings, overridable by environment variables of the same name in upper case."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    model_version: VariantName = Field("svd", description="Which SVD variant to serve.")
    model_tag: str | None = Field(
        None,
        description="Serve this model-store tag instead of `<variant>:latest` "
        "(e.g. `svd_xt-synthetic:latest` for benchmarks).",
    )
    device: str = Field("auto", description="`auto` (CUDA if present, else CPU), `cuda`, `cpu`.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="`auto`: float16 on CUDA, float32 on CPU."
    )
    timeout: int = Field(300, ge=1, description="Seconds a request may take end to end.")
    max_upload_bytes: int = Field(20 * 2**20, ge=1, description="Largest accepted upload.")
    upload_timeout: float = Field(
        60, gt=0, description="Seconds a request's body may take to arrive; a slower (or "
        "stuck) client gets 408 and its buffer is freed.",
    )
    max_params_bytes: int = Field(
        16 * 2**10, ge=256, description="Largest accepted `params` form field, in bytes.")
    max_params_depth: int = Field(
        4, ge=1, description="Deepest nesting of arrays and objects accepted in `params`.")
    max_number_digits: int = Field(
        32, ge=17, description="Most digits accepted in one number in `params`.")
    max_image_pixels: int = Field(
        50_000_000, ge=1, description="Largest accepted image, in pixels (decompression bombs)."
    )
    max_aspect_ratio: float = Field(10.0, ge=1.0, description="Longest over shortest side.")
    min_image_side: int = Field(16, ge=1, description="Smallest accepted image side, in pixels.")
    video_crf: int = Field(17, ge=0, le=51, description="H.264 quality (0 best, 51 worst).")
    video_preset: Literal[X264_PRESETS] = Field(
        "veryfast", description="libx264 speed preset for MP4: faster presets take less "
        "time for slightly lower quality at the same file size (docs/performance.md).",
    )
    gpu_workers: int = Field(1, ge=1, description="GPU worker processes (one per GPU).")
    cfg_parallel: int = Field(
        1, ge=1, le=2, description="2: each GPU worker takes a pair of GPUs and runs the two "
        "halves of classifier-free guidance (unconditional, conditional) of every step on one "
        "each, exchanging the noise predictions (docs/performance.md); both compile before "
        "/readyz (COMPILE_IN_BACKGROUND does not apply). GPU_WORKERS x CFG_PARALLEL GPUs in "
        "all; 1: one GPU per worker.",
    )
    cfg_parallel_timeout: float = Field(
        60, gt=0, description="With CFG_PARALLEL=2: seconds a step waits for the second GPU's "
        "half once its own is queued (steps that compile, at warm-up, wait up to 15 minutes); "
        "past it the request fails and the second GPU's process is restarted.",
    )
    max_queue: int = Field(
        4, ge=0, description="Requests that may wait for a GPU beyond those running; past it, 429."
    )
    jobs_dir: str = Field(
        "~/.bentosvd/jobs", description="Where async jobs are kept: their input images, their "
        "videos and (without JOBS_DATABASE_URL) the SQLite database. Several replicas need one "
        "shared volume here.",
    )
    jobs_database_url: str | None = Field(
        None, description="`postgresql://user:password@host/db`: every replica reads and "
        "writes the same jobs. Unset: SQLite in JOBS_DIR, for one server.",
    )
    job_ttl: int = Field(
        3600, ge=1, description="Seconds a finished async job (and its video) is kept for "
        "GET /jobs/<id>/result.",
    )
    max_finished_jobs: int = Field(
        64, ge=1, description="Finished async jobs kept at most; the oldest are forgotten first.",
    )
    max_job_bytes: int = Field(
        2 * 2**30, ge=1, description="Bytes of finished jobs' videos kept at most; the oldest "
        "are forgotten first.",
    )
    job_lease: float = Field(
        10, gt=0, description="Seconds without a heartbeat after which a replica's queued and "
        "running jobs are taken over by another (it is taken for dead).",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        [], description="Keys accepted in `Authorization: Bearer <key>`, comma-separated; "
        "set, every route but /livez, /readyz and the web page's files needs one (401 "
        "otherwise). Empty: no key needed. Set it (or API_KEYS_FILE) on any exposed deploy.",
    )
    api_keys_file: str | None = Field(
        None, description="A file of accepted keys, one a line (`#` comments), read again "
        "when it changes: rotate a key without a restart. Adds to API_KEYS.",
    )
    metrics_need_key: bool = Field(
        False, description="With keys set, /metrics needs one too (open by default for "
        "Prometheus scrapers inside the cluster).",
    )
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        [], description="Hosts (names, addresses or networks such as `10.0.0.0/8`) that job "
        "webhooks may be sent to, comma-separated. Empty: webhooks are off.",
    )
    webhook_secret: str | None = Field(
        None, description="The key webhook deliveries are signed with (Standard Webhooks: "
        "`whsec_` and base64); webhooks need it.",
    )
    webhook_max_attempts: int = Field(
        6, ge=1, le=20, description="Tries of one webhook delivery, waiting 1, 2, 4, ... s "
        "between them.",
    )
    max_faults_in_a_row: int = Field(
        3, ge=1, description="Failed generations in a row (GPU out of memory or an unexpected "
        "error in the worker) after which /livez fails."
    )
    worker_silent_limit: float = Field(
        900, gt=0, description="Seconds a GPU worker may leave /livez's health check "
        "unanswered (it holds its event loop while it loads and compiles the model) before "
        "/livez fails so the pod is restarted; the default matches the Kubernetes startup "
        "probe's 15 minutes.",
    )
    inject_faults: list[Literal["gpu_oom", "internal", "encode_stall"]] = Field(
        [], description="Tests only: the next generations fail, one per entry, with a CUDA "
        'out-of-memory (`gpu_oom`), an unexpected exception (`internal`) or a video encode '
        'that never finishes (`encode_stall`), e.g. `["internal", "gpu_oom"]`.',
    )
    inject_load_delay: list[Annotated[float, Field(ge=0)]] = Field(
        [0], description="Tests only: seconds more each GPU worker takes to load (the last "
        "entry for workers past the list), holding its event loop as importing torch does "
        "(its readiness probe then goes unanswered), e.g. `[0, 8]`.",
    )
    fast_path: bool | None = Field(
        None, description="torch.compile the UNet and, with compile_vae, the VAE's decoder "
        "(compiled before /readyz turns 200); "
        "default: on with CUDA, off on the CPU.",
    )
    compile_regions: bool = Field(
        True, description="With the fast path, compile the UNet block by block instead of "
        "as one graph: much less compiling at the first start and tracing at a restart.",
    )
    compile_vae: bool = Field(
        True, description="With the fast path, also compile the VAE's decoder (for "
        "decoding_t=1, warmed before /readyz; other decoding_t values decode eagerly): "
        "faster requests, a longer first start (docs/performance.md).",
    )
    low_memory: bool = Field(
        False, description="Model offload and chunked feed-forward: SVD-XT within 8 GiB, slower."
    )
    fp8: bool = Field(
        False, description="FP8 matmuls in the UNet's transformer blocks (torchao; GPUs of "
        "compute capability 8.9+, with the fast path): faster, output deviates more than fp16 "
        "rounding (see docs/performance.md).",
    )
    step_cache: int = Field(
        0, ge=0, le=10, description="Step caching: run the whole UNet every N-th denoising step "
        "and only its outermost level in between (N 2-10; 0: off). Faster, and the video "
        "changes (see docs/performance.md).",
    )
    step_cache_layers: int = Field(
        0, ge=0, le=3, description="With STEP_CACHE: the steps between run only this many "
        "layers of the UNet's outermost level (1-3, as every SVD variant's UNet has 3; 0: "
        "all of it). Fewer: faster, and the video changes more (see docs/performance.md).",
    )
    warmup: list[Literal["landscape", "portrait"]] = Field(
        ["landscape", "portrait"],
        description="Shapes warmed before /readyz turns 200: compiled with the fast path (a "
        "request of a shape left out runs the UNet eagerly instead of compiling inside the "
        "request), else run once (one step, decoded and encoded) so the first request is "
        "as fast as the next.",
    )
    rife_model: str = Field(
        "rife", description="The RIFE model (frame interpolation) in the model store: `rife` "
        "for the latest registered, a full tag, or `none`. Without one, interpolation uses "
        "FFmpeg's minterpolate.",
    )
    compile_in_background: bool = Field(
        True, description="With the fast path and a compile cache that lacks this model's "
        "blocks (a fresh node): /readyz turns 200 once one eager generation per WARMUP shape "
        "has run, requests run eagerly while the compiled blocks are built in the background, "
        "one at a time between requests, "
        "and each shape runs compiled from the request after its blocks are done. Off: they "
        "are compiled before /readyz turns 200. A cache that has them all loads before "
        "/readyz either way.",
    )
    compile_cache_dir: str = Field(
        "~/.cache/bentosvd/inductor",
        description="torch.compile's cache (TORCHINDUCTOR_CACHE_DIR), with the UNet's blocks "
        "compiled ahead of time in its aot/ folder; keep it on a volume so a restart neither "
        "compiles nor traces again.",
    )

    @field_validator("api_keys", "webhook_allowed_hosts", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if isinstance(value, str):
            if value.strip().startswith("["):  # a JSON list, as the other list settings take
                return json.loads(value)
            # API_KEYS=key1,key2 (spaces around commas ignored)
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _step_cache_rules(self) -> Settings:
        problem = step_cache_problem(self.step_cache, self.step_cache_layers)
        if problem:
            raise ValueError(problem.replace("step_cache_layers", "STEP_CACHE_LAYERS")
                             .replace("step_cache", "STEP_CACHE"))
        if self.step_cache and self.variant.sampler != "euler":
            # Skipping most of the UNet on steps between full ones pays over 25-30 Euler
            # steps; a consistency sampler's few steps each jump far, with nothing to reuse.
            raise ValueError(f"STEP_CACHE={self.step_cache} is not for MODEL_VERSION="
                             f"{self.model_version}: its {self.variant.num_inference_steps} "
                             "consistency steps leave nothing to skip; unset STEP_CACHE")
        return self

    @model_validator(mode="after")
    def _cfg_parallel_rules(self) -> Settings:
        if self.cfg_parallel == 1:
            return self
        problems = [
            (self.low_memory, "LOW_MEMORY, which runs both halves on one small GPU in turn"),
            (self.step_cache, "STEP_CACHE, whose kept features are both halves' in one process"),
            (not self.compile_regions and self.fast_path is not False,
             "COMPILE_REGIONS=false: the UNet compiled as one graph would take in the exchange "
             "between the two GPUs"),
        ]
        for refused, what in problems:
            if refused:
                raise ValueError(f"CFG_PARALLEL=2 does not work with {what}; unset one of them")
        if self.variant.max_guidance_scale <= 1:
            raise ValueError(f"CFG_PARALLEL=2 is not for MODEL_VERSION={self.model_version}: "
                             "it samples without classifier-free guidance, so there is no "
                             "second half to run on a second GPU; unset CFG_PARALLEL")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"CFG_PARALLEL=2 takes a pair of GPUs per worker (worker i: "
                             f"cuda:2i and cuda:2i+1): set DEVICE to auto or cuda, not "
                             f"{self.device}")
        return self

    @property
    def variant(self) -> Variant:
        return VARIANTS[self.model_version]

    @property
    def variant_tag(self) -> str:
        return self.model_tag or f"{self.variant.store_name}:latest"


@cache
def get_settings() -> Settings:
    return Settings()


class Params(BaseModel):
    """The `params` JSON field of `POST /generate`. Every field is optional.

    Unknown fields are refused (400) so a typo never silently falls back to a default.
    """

    model_config = ConfigDict(extra="forbid")

    fps_id: int = Field(
        6, ge=1, le=30,
        description="Frame-rate conditioning; the video plays at fps_id + 1 frames per second.",
    )
    motion_bucket_id: int | None = Field(
        None, ge=0, le=255, description="Amount of motion (trained range 0-255; higher moves "
        "more); null: the variant's (GET /info gives it).",
    )
    cond_aug: float = Field(
        0.02, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Noise added to the conditioning image; more noise, less like the input.",
    )
    decoding_t: int = Field(
        1, ge=1, le=25,
        description="Frames the VAE decodes at a time (1 to the variant's frame count): "
        "more is faster and uses more GPU memory, and changes the output slightly.",
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED,
        description=f"Random seed, 0 to {MAX_SEED}; null picks one. The seed used is returned "
        "in the X-Seed header.",
    )
    # More control; each omitted keeps the blog's behaviour (the variant's reference values).
    format: Literal[tuple(FORMATS)] | None = Field(
        None, description="Output: mp4 (H.264), webm (VP9), gif or webp (animated, looping). "
        "null: from the Accept header, else mp4.",
    )
    boomerang: bool = Field(False, description="Play forward then backward (2F-2 frames).")
    interpolate_fps: int | None = Field(
        None, ge=2, le=MAX_INTERPOLATED_FPS,
        description="Raise the frame rate to this many fps by interpolating frames (must be "
        "above fps_id + 1); the clip keeps its length: (F-1)*interpolate_fps//fps + 1 frames. "
        "null: no interpolation.",
    )
    interpolation: Literal["rife", "minterpolate"] | None = Field(
        None, description="How interpolate_fps makes the new frames: rife (a learned model, "
        "on the GPU, when one is registered) or minterpolate (FFmpeg's motion compensation, "
        "on the CPU). null: rife if registered, else minterpolate.",
    )
    num_frames: int | None = Field(
        None, ge=2, le=MAX_FRAMES,
        description="Frames to generate (2 to the variant's frame count); null: the variant's.",
    )
    num_inference_steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="Denoising steps, 1 to the variant's most (GET "
        "/info gives it); null: the variant's.",
    )
    # At least 1: below it diffusers silently turns guidance off, which Stability's own
    # sampler does not; refused rather than quietly meaning something else.
    min_guidance_scale: float | None = Field(
        None, ge=1.0, le=MAX_GUIDANCE, allow_inf_nan=False,
        description="Guidance for the first frame (at least 1); null: the variant's.",
    )
    max_guidance_scale: float | None = Field(
        None, ge=1.0, le=MAX_GUIDANCE, allow_inf_nan=False,
        description="Guidance for the last frame (at least min_guidance_scale); null: the variant's.",
    )
    sizing: Literal["crop", "pad", "fit", "native"] = Field(
        "crop", description="How the image meets the model's size: crop (cover, cut the "
        "centre), pad (fit inside, black bars), fit (stretch), or native (the upstream "
        "sample's: the image's own size within the model's pixels, sides rounded down to "
        "a multiple of 64).",
    )
    orientation: Literal["auto", "landscape", "portrait"] = Field(
        "auto", description="Video orientation: auto follows the image (portrait if taller "
        "than wide), or force landscape (e.g. 1024x576) or portrait (576x1024).",
    )
