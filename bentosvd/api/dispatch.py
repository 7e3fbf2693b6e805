"""Handing requests to GPU workers: first come, first served, a bounded queue.

The API service admits a request with `Dispatcher.enter()` (or refuses it with `Full`
when every worker is busy and the queue is full), waits for a free worker with
`Ticket.wait()` and gives the worker back with `Ticket.leave()`. Each worker runs one
generation at a time, so a request only ever waits here, in order, where its queue
position is known (`Ticket.position`). All of it runs on one asyncio event loop.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque


class Full(Exception):
    """Every worker is busy and the queue holds `max_waiting` requests."""


class Ticket:
    """One admitted request: waiting for a worker, then holding one."""

    def __init__(self, dispatcher: Dispatcher):
        self._dispatcher = dispatcher
        self._assigned = asyncio.Event()
        self.worker: int | None = None

    @property
    def position(self) -> int | None:
        """Requests ahead of this one in the queue (0: next); None once it has a worker."""
        waiting = self._dispatcher._waiting
        return waiting.index(self) if self in waiting else None

    async def wait(self) -> int:
        """The index of the worker this request may use, once one is free."""
        await self._assigned.wait()
        return self.worker

    def leave(self) -> None:
        """Give the worker back, or the place in the queue; safe to call twice."""
        self._dispatcher._leave(self)


class Dispatcher:
    """`on_change(waiting)` is called whenever the number of waiting requests may have
    changed (e.g. to set a queue-depth gauge)."""

    def __init__(self, workers: int, max_waiting: int, on_change=lambda waiting: None):
        self.workers = workers
        self.max_waiting = max_waiting
        self.on_change = on_change
        self._idle = list(range(workers))
        self._waiting: deque[Ticket] = deque()

    @property
    def running(self) -> int:
        return self.workers - len(self._idle)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def enter(self, force: bool = False) -> Ticket:
        """A place in the queue; `Full` past `max_waiting`, unless `force` (a job accepted
        before, run again after a crash, is never refused)."""
        if not force and not self._idle and len(self._waiting) >= self.max_waiting:
            raise Full(f"{self.running} requests are running and {self.waiting} are queued "
                       f"(the limit is {self.workers + self.max_waiting})")
        ticket = Ticket(self)
        self._waiting.append(ticket)
        self._assign()
        self.on_change(self.waiting)
        return ticket

    def _assign(self) -> None:
        while self._idle and self._waiting:
            ticket = self._waiting.popleft()
            ticket.worker = self._idle.pop(0)  # the lowest free index: worker 0 first
            ticket._assigned.set()

    def _leave(self, ticket: Ticket) -> None:
        if ticket in self._waiting:
            self._waiting.remove(ticket)
        elif ticket.worker is not None:
            self._idle.append(ticket.worker)
            self._idle.sort()
            ticket.worker = None
            self._assign()
        self.on_change(self.waiting)


class RecentDuration:
    """A moving average of generation times, to tell refused clients when to come back."""

    def __init__(self, first_guess: float = 10.0, weight: float = 0.2):
        self.seconds: float | None = None
        self.first_guess, self.weight = first_guess, weight

    def record(self, seconds: float) -> None:
        self.seconds = seconds if self.seconds is None else (
            (1 - self.weight) * self.seconds + self.weight * seconds)

    def retry_after(self, ahead: int, workers: int) -> int:
        """Whole seconds until a place is likely free: one generation's time for each
        request ahead, shared by the workers; at least 1."""
        per_request = self.seconds or self.first_guess
        return max(1, math.ceil(per_request * max(1, ahead) / workers))
