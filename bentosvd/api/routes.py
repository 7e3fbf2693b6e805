"""The GET and DELETE routes beside BentoML's POST APIs: `/info` and the async jobs'
`/jobs/{id}`, `/jobs/{id}/result` and `DELETE /jobs/{id}`.

BentoML's `@bentoml.api` takes POST bodies only, so these are plain Starlette routes, served
by the `PlainRoutes` middleware; each reaches the running API service through
`bentoml.get_current_service()`.
"""

from __future__ import annotations

import asyncio
from typing import Literal

import bentoml
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route

from bentosvd.api.generations import Generations
from bentosvd.api.jobs import Job
from bentosvd.config import DEMO_WARNING, Params, get_settings
from bentosvd.errors import error_response
from bentosvd.media.formats import FORMATS


def _generations() -> Generations:
    return bentoml.get_current_service().generations


async def info(request) -> JSONResponse:
    """GET /info: the model, its sizes, every param's schema with the model's bounds, and
    each GPU worker's device, speed-ups and WARMUP shapes (compiled, compiling or eager)."""
    variant = get_settings().variant
    workers = await _generations().workers_state()
    schema = Params.model_json_schema()["properties"]
    for name, prop in schema.items():  # pydantic writes optionals as anyOf [..., null]
        for option in prop.pop("anyOf", []):
            if option.get("type") != "null":
                prop.update(option)
    schema["num_frames"]["maximum"] = variant.num_frames
    schema["decoding_t"]["maximum"] = variant.num_frames
    schema["num_inference_steps"]["default"] = variant.num_inference_steps
    schema["num_inference_steps"]["maximum"] = variant.max_inference_steps
    schema["motion_bucket_id"]["default"] = variant.motion_bucket_id
    schema["num_frames"]["default"] = variant.num_frames
    schema["min_guidance_scale"]["default"] = variant.min_guidance_scale
    schema["max_guidance_scale"]["default"] = variant.max_guidance_scale
    schema["format"]["default"] = "mp4"
    schema["interpolation"]["default"] = "rife" if _generations().rife else "minterpolate"
    return JSONResponse({
        "model": variant.name, "description": variant.description,
        "warning": DEMO_WARNING if variant.demo else None,
        "width": variant.width, "height": variant.height, "num_frames": variant.num_frames,
        "num_inference_steps": variant.num_inference_steps, "formats": list(FORMATS),
        "params": schema, "workers": workers,
    })


async def _job_or_404(request) -> Job | JSONResponse:
    job = await _generations().jobs.get(request.path_params["job_id"])
    if job is None:
        settings = get_settings()
        return error_response(404, "no such job (finished jobs are kept for "
                              f"{settings.job_ttl} s, at most {settings.max_finished_jobs})")
    return job


async def job_status(request) -> JSONResponse:
    job = await _job_or_404(request)
    return job if isinstance(job, JSONResponse) else JSONResponse(job.to_json())


async def job_result(request) -> Response:
    job = await _job_or_404(request)
    if isinstance(job, JSONResponse):
        return job
    if job.status == "cancelled":
        return error_response(410, "the job was cancelled; it has no video")
    if not job.finished:
        return error_response(409, f"the job is {job.status} (step {job.step} of "
                              f"{job.total_steps}); poll /jobs/{job.id} until it has finished")
    generations = _generations()
    video = await generations.jobs.read_video(job) if job.status == "succeeded" else None
    if job.status == "succeeded" and video is None:
        return error_response(410, "the job's video is no longer kept (see JOB_TTL and "
                              "MAX_JOB_BYTES)")
    return generations.answer(job, video)


async def job_cancel(request) -> JSONResponse:
    """Cancel a queued or running job (its GPU work stops at the next step, on whichever
    replica runs it); a finished job is forgotten, with its video."""
    job = await _job_or_404(request)
    if isinstance(job, JSONResponse):
        return job
    jobs = _generations().jobs
    if job.task is not None and not job.finished:
        job.task.cancel()
        await asyncio.wait({job.task})
    elif not job.finished:  # run by another replica: it sees the request at its next beat
        await jobs.request_cancel(job.id)
    else:
        await jobs.remove(job)
    return JSONResponse(job.to_json())


ROUTES = [
    Route("/info", info, methods=["GET"]),
    Route("/jobs/{job_id}", job_status, methods=["GET"]),
    Route("/jobs/{job_id}", job_cancel, methods=["DELETE"]),
    Route("/jobs/{job_id}/result", job_result, methods=["GET"]),
]


class JobState(BaseModel):
    """A job's JSON (`Job.to_json`), as GET /jobs/{id} answers it."""

    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    queue_position: int | None
    step: int
    total_steps: int
    seed: int
    format: str
    attempt: int
    error: dict | None = Field(description="a failed job's error, in the one error shape")
    created_at: float
    finished_at: float | None
    timings: dict[str, float]
    status_url: str
    result_url: str


class ErrorBody(BaseModel):
    error: str
    message: str
    field: str | None = None
    fix: str | None = None
    request_id: str | None = None


def _json(model: type[BaseModel] | None, description: str) -> dict:
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}} \
        if model else {}
    return {"description": description, **({"content": content} if content else {})}


_ERRORS = {"401": _json(ErrorBody, "an API key is needed (API_KEYS)"),
           "404": _json(ErrorBody, "no such job, or forgotten")}
_JOB_ID = [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}]
VIDEO_TYPES = {fmt.media_type: {"schema": {"type": "string", "format": "binary"}}
               for fmt in FORMATS.values()}

# What ROUTES do, in OpenAPI: added to BentoML's own schema at /docs.json, so that
# generated clients see the whole API (tests/test_openapi.py checks every route is there).
OPENAPI_PATHS = {
    "/info": {"get": {
        "tags": ["Service APIs"], "summary": "The model, its sizes, and every param's schema",
        "operationId": "info",
        "responses": {"200": {"description": "the model and its params",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      "401": _ERRORS["401"]}}},
    "/jobs/{job_id}": {
        "get": {"tags": ["Service APIs"], "summary": "A job's status, queue position and step",
                "operationId": "job_status", "parameters": _JOB_ID,
                "responses": {"200": _json(JobState, "the job"), **_ERRORS}},
        "delete": {"tags": ["Service APIs"], "operationId": "job_cancel",
                   "summary": "Cancel a queued or running job; forget a finished one",
                   "parameters": _JOB_ID,
                   "responses": {"200": _json(JobState, "the job as it was cancelled"), **_ERRORS}}},
    "/jobs/{job_id}/result": {"get": {
        "tags": ["Service APIs"], "summary": "The finished job's video, or its error",
        "operationId": "job_result", "parameters": _JOB_ID,
        "responses": {"200": {"description": "the video", "content": VIDEO_TYPES},
                      "409": _json(ErrorBody, "not finished yet"),
                      "410": _json(ErrorBody, "cancelled, or its video no longer kept"),
                      **_ERRORS}}},
}
SCHEMAS = {model.__name__: model.model_json_schema(ref_template="#/components/schemas/{model}")
           for model in (JobState, ErrorBody)}


def with_plain_routes(spec: dict) -> dict:
    """BentoML's OpenAPI schema with ROUTES added."""
    spec = {**spec, "paths": {**spec.get("paths", {}), **OPENAPI_PATHS}}
    components = dict(spec.get("components") or {})
    components["schemas"] = {**components.get("schemas", {}), **SCHEMAS}
    spec["components"] = components
    return spec


class PlainRoutes:
    """ASGI middleware: a request that fully matches one of `routes` is answered here,
    anything else goes on to BentoML. `openapi()` gives BentoML's schema, served at
    /docs.json with these routes added."""

    def __init__(self, app, routes: list[Route] = ROUTES, openapi=None):
        self.app, self.routes = app, routes
        if openapi is not None:
            self.routes = [*routes, Route("/docs.json", lambda request: JSONResponse(
                with_plain_routes(openapi())), methods=["GET"])]

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for route in self.routes:
                match, child_scope = route.matches(scope)
                if match == Match.FULL:
                    scope.update(child_scope)
                    return await route.handle(scope, receive, send)
        await self.app(scope, receive, send)
