"""The GET and DELETE routes beside BentoML's POST APIs: `/info` and the async jobs'
`/jobs/{id}`, `/jobs/{id}/result` and `DELETE /jobs/{id}`.

BentoML's `@bentoml.api` takes POST bodies only, so these are plain Starlette routes, served
by the `PlainRoutes` middleware; each reaches the running API service through
`bentoml.get_current_service()`.
"""

from __future__ import annotations

import asyncio

import bentoml
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route

from bentosvd.api.generations import Generations
from bentosvd.api.jobs import Job
from bentosvd.config import DEMO_WARNING, Params, get_settings
from bentosvd.errors import error_response
from bentosvd.media.formats import FORMATS


def _generations() -> Generations:
    return bentoml.get_current_service().generations


def info(request) -> JSONResponse:
    """GET /info: the model, its sizes, and every param's schema with the model's bounds."""
    variant = get_settings().variant
    schema = Params.model_json_schema()["properties"]
    for name, prop in schema.items():  # pydantic writes optionals as anyOf [..., null]
        for option in prop.pop("anyOf", []):
            if option.get("type") != "null":
                prop.update(option)
    schema["num_frames"]["maximum"] = variant.num_frames
    schema["decoding_t"]["maximum"] = variant.num_frames
    schema["num_inference_steps"]["default"] = variant.num_inference_steps
    schema["num_frames"]["default"] = variant.num_frames
    schema["min_guidance_scale"]["default"] = variant.min_guidance_scale
    schema["max_guidance_scale"]["default"] = variant.max_guidance_scale
    schema["format"]["default"] = "mp4"
    return JSONResponse({
        "model": variant.name, "description": variant.description,
        "warning": DEMO_WARNING if variant.name == "demo" else None,
        "width": variant.width, "height": variant.height, "num_frames": variant.num_frames,
        "num_inference_steps": variant.num_inference_steps, "formats": list(FORMATS),
        "params": schema,
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


class PlainRoutes:
    """ASGI middleware: a request that fully matches one of `routes` is answered here,
    anything else goes on to BentoML."""

    def __init__(self, app, routes: list[Route] = ROUTES):
        self.app, self.routes = app, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for route in self.routes:
                match, child_scope = route.matches(scope)
                if match == Match.FULL:
                    scope.update(child_scope)
                    return await route.handle(scope, receive, send)
        await self.app(scope, receive, send)
