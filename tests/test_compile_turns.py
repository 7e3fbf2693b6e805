"""The background compile never runs beside a request: each block is built in a turn of
the engine's lock, and requests waiting for the lock go before it (bentosvd.worker.engine
GpuTurns). A compile beside a request made it 3.5x slower on the GPU and, once, failed it:
torch.fx's tracer patches `torch.nn.Module.__call__` for the whole process while it traces."""

from __future__ import annotations

import contextlib
import threading
import time

import torch

from bentosvd.svd.compiled_blocks import SavedRegions
from bentosvd.worker.engine import GpuTurns


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.nn.functional.gelu(self.linear(x)) * 2


def test_a_block_is_built_only_in_its_turn(tmp_path):
    torch.manual_seed(0)
    block = Block().eval()
    regions = SavedRegions([block], tmp_path, may_build=lambda: False)
    x = torch.randn(4, 8)
    with torch.no_grad():
        eager = block(x)  # nothing compiled, building not allowed: recorded and run eagerly
    keys = set(regions.wanted)
    assert len(keys) == 1

    lock = threading.Lock()
    in_turn = []  # for each build, whether it ran inside its turn
    held = threading.Event()

    @contextlib.contextmanager
    def turn():
        with lock:
            held.set()
            yield
            held.clear()

    build = regions._build
    regions._build = lambda *a, **k: (in_turn.append(held.is_set()), build(*a, **k))[1]
    lock.acquire()  # a request running
    builder = threading.Thread(target=regions.build, args=(keys,), kwargs={"turn": turn})
    builder.start()
    time.sleep(1.0)
    assert sum(regions.counts.values()) == 0 and not any(tmp_path.rglob("*.bin")), \
        "a block was built while the lock was held"
    lock.release()
    builder.join(600)
    assert not builder.is_alive()
    assert sum(regions.counts.values()) == 1 and in_turn == [True], in_turn
    assert regions.adopt() == 1
    with torch.no_grad():
        torch.testing.assert_close(block(x), eager)


def test_waiting_requests_go_before_the_background_compile():
    turns = GpuTurns()
    order: list[str] = []
    running = threading.Event()
    finish = threading.Event()

    def first_request():
        with turns.request():
            running.set()
            finish.wait(10)
            order.append("request 1")

    def later(name, turn):
        with turn():
            order.append(name)

    threads = [threading.Thread(target=first_request)]
    threads[0].start()
    assert running.wait(10)
    # The compile asks first, a request after it: the request still goes first.
    threads.append(threading.Thread(target=later, args=("compile", turns.background)))
    threads[-1].start()
    time.sleep(0.3)
    threads.append(threading.Thread(target=later, args=("request 2", turns.request)))
    threads[-1].start()
    time.sleep(0.3)
    finish.set()
    for t in threads:
        t.join(10)
    assert order == ["request 1", "request 2", "compile"], order


def test_the_compile_gets_its_turn_when_no_request_waits():
    turns = GpuTurns()
    done = threading.Event()

    def compile_piece():
        with turns.background():
            done.set()

    threading.Thread(target=compile_piece).start()
    assert done.wait(5)
