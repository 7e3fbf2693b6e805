"""BentoSVD's services: `POST /generate` turns one image into a video.

`SVD`, the API service, checks the form before BentoML reads it (`bentosvd/api/guard.py`),
decodes and sizes the upload, queues the request for a free GPU worker and answers with the
video, a job to poll, or a JSON error (`bentosvd/api/generations.py`). Each
`GenerationWorker` (`bentosvd/worker/service.py`, one per GPU) holds the SVD pipeline and
streams its progress back over the typed protocol of `bentosvd/protocol.py`.
`bentoml serve service:svc` serves them all.
"""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path
from typing import Annotated

import bentoml
from bentoml.validators import ContentType
from starlette.responses import JSONResponse
from starlette.staticfiles import StaticFiles

from bentosvd.api.auth import ApiKeys, RequireApiKey
from bentosvd.api.generations import Generations
from bentosvd.api.guard import AnswerErrors, JsonField, RequestGuard
from bentosvd.api.routes import PlainRoutes
from bentosvd.api.webhooks import WebhookSpec
from bentosvd.config import Params
from bentosvd.errors import ServiceError, error_response
from bentosvd.worker.service import WORKERS, settings


# BentoML keeps its tasks' results (image_to_video below) in BENTOML_HOME/task_result.db and
# deletes that file at every start, so two servers on one model store (replicas sharing a
# volume) would delete each other's. Each server gets its own file, on local disk; its
# processes inherit the path. Tasks do not outlive their server either way (docs/api.md).
if "BENTOML_RESULT_STORE" not in os.environ:
    _task_store = Path(tempfile.gettempdir()) / f"bentosvd-tasks-{os.getpid()}.db"
    os.environ["BENTOML_RESULT_STORE"] = str(_task_store)
    # The process that chose the file (`bentoml serve`'s own) removes it when it exits.
    atexit.register(_task_store.unlink, missing_ok=True)


class SVD:
    """The API: checks the request, sizes the image, queues it for a GPU worker, answers
    with the video (`POST /generate`) or a job to follow (`POST /jobs`)."""

    def __init__(self) -> None:
        workers = [getattr(self, f"worker{i}") for i in range(len(WORKERS))]
        self.generations = Generations(settings, settings.variant, workers)

    @bentoml.api(route="/generate")
    async def generate(
        self, ctx: bentoml.Context, img: Path, params: Params = Params()
    ) -> Annotated[Path, ContentType("video/mp4")]:
        """Turn one image into a video (MP4 unless `format` or the Accept header asks for
        WebM, GIF or WebP). The seed used comes back in `X-Seed`."""
        response = await self.generations.generate(ctx.request, img, params)
        # With a Context parameter BentoML sets the status from ctx.response, not ours.
        ctx.response.status_code = response.status_code
        return response

    @bentoml.task(route="/image_to_video")
    async def image_to_video(
        self, ctx: bentoml.Context, img: Path, params: Params = Params()
    ) -> Annotated[Path, ContentType("video/mp4")]:
        """`POST /generate` as a BentoML task: `client.image_to_video.submit(img=..., params=...)`,
        then `.get_status()` and `.get()`; on BentoCloud its queue carries the work across
        replicas. For progress, cancel and restarts, use `POST /jobs` (docs/api.md)."""
        response = await self.generations.generate(ctx.request, img, params, client_waits=False)
        ctx.response.status_code = response.status_code
        return response

    @bentoml.api(route="/jobs")
    async def submit_job(self, ctx: bentoml.Context, img: Path, params: Params = Params(),
                         webhook: WebhookSpec | None = None) -> dict:
        """Queue a generation and answer at once (202) with its id: follow it at
        `GET /jobs/<id>` (status, queue position, step i of N), fetch the video from
        `GET /jobs/<id>/result`, stop it with `DELETE /jobs/<id>`. With `webhook`, its
        events are also POSTed to that URL, signed (docs/api.md, webhooks)."""
        try:
            job = await self.generations.submit(ctx.request, img, params, webhook)
        except ServiceError as e:
            response = error_response(e)
        else:
            response = JSONResponse(job.to_json(), status_code=202,
                                    headers={"Location": f"/jobs/{job.id}"})
        ctx.response.status_code = response.status_code
        return response

    @bentoml.on_startup
    async def _open_jobs(self) -> None:
        await self.generations.start()

    @bentoml.on_shutdown
    async def _put_jobs_back(self) -> None:
        await self.generations.stop()

    async def __is_alive__(self) -> bool:
        return await self.generations.alive()


# One dependency per GPU worker service (worker0, worker1, ...): BentoML reads them from
# the class when the service is made.
for _index, _worker in enumerate(WORKERS):
    setattr(SVD, f"worker{_index}", bentoml.depends(_worker))
SVD = bentoml.service(name="svd-service", traffic={"timeout": settings.timeout})(SVD)

# Middleware, the first added outermost: every request answered even when its handler
# raises; the API key (when keys are set); the GET/DELETE routes; then, for the two POST
# APIs, the form checked before BentoML reads it: one uploaded `img` file (a URL string
# would make BentoML download it), at most one `params` of bounded size, depth and numbers,
# nothing else, a bounded body (the extra 64 KiB is the form around an image of
# MAX_UPLOAD_BYTES).
SVD.add_asgi_middleware(AnswerErrors)
SVD.add_asgi_middleware(RequireApiKey, keys=ApiKeys(settings.api_keys, settings.api_keys_file),
                        metrics_open=not settings.metrics_need_key)
SVD.add_asgi_middleware(PlainRoutes, openapi=lambda: SVD.openapi_spec.asdict())
_params = JsonField(Params, max_bytes=settings.max_params_bytes,
                    max_depth=settings.max_params_depth, max_digits=settings.max_number_digits)
_webhook = JsonField(WebhookSpec, max_bytes=4096, max_depth=2, max_digits=settings.max_number_digits)
for _path, _fields in (("/generate", {"params": _params}),
                       ("/image_to_video/submit", {"params": _params}),
                       ("/jobs", {"params": _params, "webhook": _webhook})):
    SVD.add_asgi_middleware(RequestGuard, path=_path, json_fields=_fields,
                            max_body_bytes=settings.max_upload_bytes + 64 * 1024,
                            body_timeout=settings.upload_timeout)
# The web page: static files, index.html at /ui/.
SVD.mount_asgi_app(StaticFiles(directory=Path(__file__).parent / "bentosvd" / "client" / "ui",
                               html=True), path="/ui")

svc = SVD
