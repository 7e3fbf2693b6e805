"""The boundary between the API service and a GPU worker, defined once for both sides.

The API sends `GenerationSettings` (what decides the frames) and `OutputSpec` (how they
are encoded) with the decoded image; the worker answers with a stream of `Event`s, one
JSON line each (`frame` / `Lines` / `parse_event`): `Started` once the GPU is the request's, `Step`
after each denoising step, then either `Generated` (the GPU is free; the video is being
encoded) and `Done`, or `Failed` with a `FailureKind` that says what happened.

Kept free of torch and diffusers, so the API service and `bentoml serve`'s own process,
which plan generations but never run one, start without importing them.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class GenerationSettings(BaseModel):
    """Everything that decides a video besides the image. Field names are diffusers'."""

    model_config = ConfigDict(frozen=True)

    num_frames: int
    num_inference_steps: int
    min_guidance_scale: float
    max_guidance_scale: float
    fps: int  # the conditioning value diffusers takes: it subtracts 1 again internally
    motion_bucket_id: int
    noise_aug_strength: float
    decode_chunk_size: int
    seed: int


class OutputSpec(BaseModel):
    """How the frames become a file: `format` at `fps`, first interpolated to
    `interpolate_fps` (by `interpolation`: RIFE on the worker's GPU as the frames are
    decoded, or minterpolate in the encode) and played forward then backward (`boomerang`)
    if asked."""

    model_config = ConfigDict(frozen=True)

    format: str
    fps: int
    boomerang: bool = False
    interpolate_fps: int | None = None
    interpolation: Literal["rife", "minterpolate"] = "minterpolate"


class FailureKind(str, Enum):
    TIMEOUT = "timeout"  # the request's deadline passed; its generation was stopped
    CANCELLED = "cancelled"  # the caller left or cancelled; its generation was stopped
    GPU_OOM = "gpu_oom"  # CUDA ran out of memory; the memory was freed, a retry may work
    INTERNAL = "internal"  # anything else: a bug, and the same request would fail again


class Started(BaseModel):
    event: Literal["started"] = "started"


class Step(BaseModel):
    event: Literal["step"] = "step"
    step: int
    total: int


class Generated(BaseModel):
    event: Literal["generated"] = "generated"


class Done(BaseModel):
    event: Literal["done"] = "done"
    video: str  # base64 of the encoded file
    timings: dict[str, float]  # seconds per phase
    gpu_peak_bytes: int | None = None  # torch's peak during the generation (CUDA only)


class Failed(BaseModel):
    event: Literal["error"] = "error"
    kind: FailureKind
    message: str


Event = Annotated[Started | Step | Generated | Done | Failed, Field(discriminator="event")]
_EVENT = TypeAdapter(Event)


def frame(event: BaseModel) -> str:
    """One event as a line of the stream (which may arrive cut into any chunks)."""
    return event.model_dump_json() + "\n"


def parse_event(line: str | bytes) -> Event:
    return _EVENT.validate_json(line)


class Lines:
    """Splits a worker's event stream, text arriving in chunks, into whole lines. Linear in
    the stream's length: the last event carries the whole video (base64, ~4 MB for SVD-XT)
    in some 500 chunks of 8 KB, and joining and splitting a growing buffer at every chunk
    cost 0.27 s a request."""

    def __init__(self) -> None:
        self._partial: list[str] = []  # the pieces of the line not yet ended

    def feed(self, chunk: str) -> list[str]:
        """The lines that `chunk` ends, without their newlines."""
        *ended, rest = chunk.split("\n")
        if ended:
            ended[0] = "".join(self._partial) + ended[0]
            self._partial = []
        if rest:
            self._partial.append(rest)
        return ended
