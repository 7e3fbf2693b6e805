"""bentosvd.api.dispatch and bentosvd.api.jobs on their own: queue order, limits, job lifetimes."""

from __future__ import annotations

import asyncio

import pytest

from bentosvd.api.dispatch import Dispatcher, Full, RecentDuration
from bentosvd.api.jobs import Job
from bentosvd.errors import ServiceError


def test_requests_get_free_workers_first_come_first_served():
    async def scenario():
        d = Dispatcher(workers=2, max_waiting=2)
        a, b, c, e = d.enter(), d.enter(), d.enter(), d.enter()
        assert [await a.wait(), await b.wait()] == [0, 1]
        assert (c.position, e.position) == (0, 1) and (d.running, d.waiting) == (2, 2)
        with pytest.raises(Full):
            d.enter()
        b.leave()  # worker 1 frees: the first in the queue takes it
        assert await c.wait() == 1 and e.position == 0
        e.leave()  # leaving the queue gives the place up
        assert d.waiting == 0
        a.leave()
        a.leave()  # twice is harmless
        f = d.enter()
        assert await f.wait() == 0 and d.running == 2

    asyncio.run(scenario())


def test_a_cancelled_wait_leaves_no_ghost_in_the_queue():
    async def scenario():
        d = Dispatcher(workers=1, max_waiting=1)
        running, waiting = d.enter(), d.enter()
        task = asyncio.ensure_future(waiting.wait())
        await asyncio.sleep(0)
        task.cancel()
        waiting.leave()
        assert d.waiting == 0
        running.leave()
        assert d.running == 0

    asyncio.run(scenario())


def test_retry_after_follows_recent_generation_times():
    recent = RecentDuration(first_guess=10)
    assert recent.retry_after(ahead=3, workers=1) == 30  # no history: the first guess
    recent.record(4.0)
    assert recent.retry_after(ahead=3, workers=2) == 6
    recent.record(9.0)  # moving average: 0.8 * 4 + 0.2 * 9 = 5
    assert recent.retry_after(ahead=1, workers=1) == 5
    assert recent.retry_after(ahead=0, workers=8) == 1  # never below one second


def test_job_json_says_where_it_is():
    job = Job(seed=7, format="gif", total_steps=25)
    body = job.to_json()
    assert body["status"] == "queued" and body["step"] == 0 and body["total_steps"] == 25
    assert body["result_url"] == f"/jobs/{job.id}/result" and body["error"] is None
    job.fail(ServiceError("cancelled", status=499))
    assert job.status == "cancelled" and job.finished
    job2 = Job(seed=1, format="mp4", total_steps=2)
    job2.fail(ServiceError("late", status=504))
    assert job2.to_json()["status"] == "failed"
    assert job2.to_json()["error"] == {"error": "Gateway Timeout", "message": "late"}


def test_lines_come_out_whole_however_the_stream_is_chunked():
    """The worker's events (small steps, then a ~4 MB video line) arrive in chunks of any
    size, cut anywhere, also right after a newline."""
    import json
    import random

    from bentosvd.protocol import Lines

    events = [json.dumps({"event": "step", "step": i}) for i in range(25)]
    events.append(json.dumps({"event": "done", "video": "A" * 4_000_000}))
    text = "\n".join(events) + "\n"
    rng = random.Random(0)
    chunkings = {
        "BentoML's 8 KB": lambda: 8192,
        "all at once": lambda: len(text),
        "random": lambda: rng.randint(1, 50_000),
    }
    for name, size in chunkings.items():
        lines, got, i = Lines(), [], 0
        while i < len(text):
            n = size()
            got.extend(lines.feed(text[i:i + n]))
            i += n
        assert got == events, name
    lines = Lines()
    assert lines.feed("no newline yet") == []
    assert lines.feed(" a\n") == ["no newline yet a"]
    assert lines.feed("\n") == [""] and lines.feed("b") == [] and lines.feed("c\nd") == ["bc"]
