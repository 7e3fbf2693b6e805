"""The probes' timer: the median of CUDA-event timings after warm-up calls (wall-clock time
without a GPU, where the probes only dry-run)."""

import time

import torch


def timed_ms(fn, repeats: int = 5, warmup: int = 2) -> float:
    """Median milliseconds of `fn()` over `repeats` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if not torch.cuda.is_available():
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
