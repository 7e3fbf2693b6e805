"""The API side of the process boundary: one generation streamed from a GPU worker.

`WorkerClient.generate` sends the request of `bentosvd.protocol`, hands each progress event
to the caller and returns the `Done` event, or raises `GenerationFailed` with the answer the
client gets. Cancelling the call tells the worker to stop at its next step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp
import numpy as np

from bentosvd.errors import ServiceError
from bentosvd.protocol import (
    Done,
    Failed,
    FailureKind,
    GenerationSettings,
    Lines,
    OutputSpec,
    parse_event,
)

logger = logging.getLogger("bentoml.svd")

HEALTH_TIMEOUT = 5  # seconds /livez waits for a worker's health before taking it as loading
# Sends of a request that no worker received (its connection was dead before a byte came
# back): a worker that died leaves every pooled connection to it dead, not just one.
SENDS = 3


class GenerationFailed(ServiceError):
    """A generation ended without a video; its status says whether to try again."""


class WorkerGone(GenerationFailed):
    """The worker process died during the generation (BentoML restarts it)."""


class WorkerClient:
    """Calls the GPU worker services (`workers[i]`: BentoML's handle of worker i).
    `retry_after()` says how long a client should wait before trying again."""

    def __init__(self, workers: list, *, timeout: int, retry_after: Callable[[], int]):
        self.workers, self.timeout, self.retry_after = workers, timeout, retry_after
        self._cancelling: set[asyncio.Task] = set()  # cancels sent by `_cancel_soon`

    async def generate(self, index: int, *, request_id: str, image: np.ndarray,
                       job: GenerationSettings, output: OutputSpec, deadline: float,
                       on_event: Callable = lambda event: None) -> Done:
        for attempt in range(1, SENDS + 1):
            received = False
            stream = self.workers[index].to_async.generate(
                request_id=request_id, image=image, job=job, output=output, deadline=deadline)
            try:
                lines = Lines()
                async for chunk in stream:
                    received = True
                    for line in lines.feed(chunk):
                        event = parse_event(line)
                        if isinstance(event, Done):
                            return event
                        if isinstance(event, Failed):
                            raise self._failure(event, request_id)
                        on_event(event)
            except asyncio.CancelledError:
                # The client left (or its job was cancelled): tell the worker to stop.
                self._cancel_soon(index, request_id)
                raise
            except TimeoutError:
                # BentoML's client ends the call after the worker service's traffic timeout
                # (TIMEOUT): the worker's own deadline should have ended it first, so the
                # stream stalled. The request timed out all the same: 504, and the worker is
                # told to stop.
                self._cancel_soon(index, request_id)
                logger.error("request %s: the worker's stream gave nothing more before the "
                             "timeout", request_id)
                raise self._timed_out(request_id) from None
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                    aiohttp.ClientPayloadError) as e:  # the last: its process died mid-stream
                if received or attempt == SENDS:
                    logger.warning("request %s: the worker's connection failed after %d "
                                   "send(s), %s: %r", request_id, attempt,
                                   "mid-stream" if received else "before any byte came", e)
                    raise self._gone(request_id) from None
                # The worker closes idle connections after 5 s while the client pool keeps
                # them for 15 s (BentoML issue #4971), and a worker that died (BentoML starts
                # it again) leaves all of its pooled connections dead: the request never
                # reached a worker, so sending it again is safe. The pause lets the event
                # loop see the other dead connections close, so that the pool drops them.
                logger.info("worker connection was stale; sending the request again")
                await asyncio.sleep(0.2 * attempt)
                continue
            finally:
                await stream.aclose()
            raise self._gone(request_id)

    def _cancel_soon(self, index: int, request_id: str) -> None:
        """`cancel` in a task of its own, for a caller that is itself ending (cancelled, or
        raising): the task is kept until done, as the event loop holds only a weak
        reference to it."""
        task = asyncio.ensure_future(self.cancel(index, request_id))
        self._cancelling.add(task)
        task.add_done_callback(self._cancelling.discard)

    async def cancel(self, index: int, request_id: str) -> None:
        try:
            await self.workers[index].to_async.cancel(request_id=request_id)
        except Exception as e:  # the worker still stops at the deadline
            logger.warning("could not cancel %s on worker %d: %r", request_id, index, e)

    async def health(self, index: int) -> dict:
        return await asyncio.wait_for(self.workers[index].to_async.health(), HEALTH_TIMEOUT)

    def _gone(self, request_id: str) -> GenerationFailed:
        return WorkerGone("the GPU worker went away during the generation (it is being "
                          "restarted); try again", status=503, request_id=request_id,
                          retry_after=self.retry_after(), error="WorkerRestarted")

    def _timed_out(self, request_id: str) -> GenerationFailed:
        return GenerationFailed(f"the video was not ready within {self.timeout} s; its "
                                "generation was stopped", status=504, request_id=request_id)

    def _failure(self, event: Failed, request_id: str) -> GenerationFailed:
        if event.kind is FailureKind.TIMEOUT:
            return self._timed_out(request_id)
        if event.kind is FailureKind.CANCELLED:
            return GenerationFailed("the generation was cancelled", status=499,
                                    request_id=request_id)
        if event.kind is FailureKind.GPU_OOM:
            return GenerationFailed("the GPU ran out of memory on this request; its memory was "
                                    "freed, try again", status=503, request_id=request_id,
                                    retry_after=self.retry_after())
        # A bug: the same request would fail again, so no Retry-After.
        return GenerationFailed(f"the GPU worker failed on request {request_id} "
                                f"({event.message}); the server log has the details",
                                status=500, request_id=request_id)
