"""WorkerClient, the API side of the process boundary, against stand-in worker handles
(BentoML's client objects need a live worker; the stand-ins play its stream of events)."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest

from bentosvd.api.worker_client import SENDS, GenerationFailed, WorkerClient
from bentosvd.protocol import (
    Done,
    Failed,
    FailureKind,
    GenerationSettings,
    OutputSpec,
    Started,
    Step,
    frame,
)

JOB = GenerationSettings(num_frames=2, num_inference_steps=2, min_guidance_scale=1,
                         max_guidance_scale=2, fps=7, motion_bucket_id=127,
                         noise_aug_strength=0.02, decode_chunk_size=1, seed=0)
DONE = Done(video="AAAA", timings={"denoise": 1.0}, gpu_peak_bytes=None)


class StandIn:
    """A worker handle whose `generate` plays the scripted streams, one per call: each a
    list of text chunks, or an exception raised before (or after) some chunks."""

    def __init__(self, *streams):
        self.streams, self.calls, self.cancelled = list(streams), 0, []
        self.to_async = self

    def generate(self, **kwargs):
        script = self.streams[self.calls]
        self.calls += 1

        async def stream():
            for item in script:
                if isinstance(item, Exception):
                    raise item
                yield item
        return stream()

    async def cancel(self, request_id):
        self.cancelled.append(request_id)


def run(worker, events=None):
    client = WorkerClient([worker], timeout=300, retry_after=lambda: 7)
    on_event = (events.append if events is not None else lambda e: None)
    return asyncio.run(client.generate(0, request_id="r1", image=np.zeros((2, 2, 3), np.uint8),
                                       job=JOB, output=OutputSpec(format="mp4", fps=7),
                                       deadline=0, on_event=on_event))


def test_events_split_across_chunks_reach_the_caller_and_done_returns():
    text = frame(Started()) + frame(Step(step=1, total=2)) + frame(DONE)
    events = []
    done = run(StandIn([text[:5], text[5:30], text[30:]]), events)
    assert done == DONE
    assert events == [Started(), Step(step=1, total=2)]


def test_a_stale_connection_before_any_byte_is_sent_once_more():
    worker = StandIn([aiohttp.ServerDisconnectedError()], [frame(DONE)])
    assert run(worker) == DONE
    assert worker.calls == 2


def test_a_dead_workers_pooled_connections_are_each_tried_before_503():
    """A worker that died leaves more than one dead connection in the pool (the request
    that was running, an idle one): the request is sent until one reaches the new worker,
    up to SENDS times, then it is 503."""
    dead = [aiohttp.ClientOSError(104, "Connection reset by peer")]
    worker = StandIn(dead, dead, [frame(DONE)])  # the running request's and an idle one
    assert run(worker) == DONE
    assert worker.calls == 3
    with pytest.raises(GenerationFailed) as e:
        run(StandIn(*[dead] * SENDS))
    assert e.value.status_code == 503


def test_a_worker_gone_mid_stream_is_503_with_retry_after():
    worker = StandIn([frame(Started()), aiohttp.ServerDisconnectedError()])
    with pytest.raises(GenerationFailed) as e:
        run(worker)
    assert worker.calls == 1  # not sent again: the worker may have run it
    assert (e.value.status_code, e.value.retry_after) == (503, 7)


@pytest.mark.parametrize("kind, status, retry_after", [
    (FailureKind.TIMEOUT, 504, None), (FailureKind.CANCELLED, 499, None),
    (FailureKind.GPU_OOM, 503, 7), (FailureKind.INTERNAL, 500, None)])
def test_each_failure_kind_has_its_answer(kind, status, retry_after):
    with pytest.raises(GenerationFailed) as e:
        run(StandIn([frame(Failed(kind=kind, message="boom"))]))
    assert (e.value.status_code, e.value.retry_after) == (status, retry_after)
    body = e.value.to_json()
    assert body["request_id"] == "r1" and set(body) >= {"error", "message"}
    if kind is FailureKind.INTERNAL:
        assert "boom" in body["message"] and "r1" in body["message"]


def test_a_stream_that_ends_without_a_result_is_503():
    with pytest.raises(GenerationFailed) as e:
        run(StandIn([frame(Started())]))
    assert e.value.status_code == 503


def test_a_call_bentomls_client_times_out_is_504_and_the_worker_is_told_to_stop():
    """A stream that stalls after its progress (the worker's deadline should end it first)
    until BentoML's client gives up (aiohttp's timeouts are TimeoutErrors): the request
    gets the timeout's 504, not a server error, and the worker is asked to stop it."""
    worker = StandIn([frame(Started()), asyncio.TimeoutError()])
    with pytest.raises(GenerationFailed) as e:
        run(worker)
    assert e.value.status_code == 504 and "300 s" in e.value.to_json()["message"]
    assert worker.cancelled == ["r1"] and worker.calls == 1
    assert issubclass(aiohttp.ServerTimeoutError, TimeoutError)  # what a read timeout raises
