"""Where does the GPU wait during a fast-path denoising step?

    python -m benchmarks.probes.gaps --out $OUT/gaps.json    # on the GPU machine, after
                                                             # scripts/device_bench.sh

Run n (2026-11-28) timed a guided step at about 431 ms while its kernels added up to
412.5 ms; run p, this probe, found the GPU idle 4.8 ms of a 430-ms step, and the progress
callback (which waits for each step's GPU work) costing nothing measurable
(benchmarks/results/h100-2026-11-28p-gaps.json). It builds the full-size synthetic
SVD-XT, runs the fast path as the server does (blocks compiled ahead of time into
TORCHINDUCTOR_CACHE_DIR's aot/ folder, a progress callback after every step), profiles
one step with the CPU and the GPU, and sums the gaps between consecutive kernels (longer
than 2 us): by where in the step they fall (its first and last 5 ms, against the rest),
and by the CPU operation that launched the kernel after each gap (the innermost `cpu_op`
or `user_annotation` around the launch: a compiled block shows as Inductor's
`## Call CompiledFxGraph ... ##`, an eager layer as its aten operator). Also writes the
gzipped Chrome trace beside the JSON (FILE.trace.json.gz; not for git).

Without a GPU it runs the eager demo model on the CPU, where there are no kernels to find
gaps between: a check of the probe, not a measurement.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from benchmarks.bench import bench_generation, bench_image, command
from benchmarks.probes import ProbeShape, add_shape_arguments
from bentosvd.svd import compiled_blocks
from bentosvd.svd.generator import VideoGenerator
from bentosvd.svd.speedups import Speedups
from bentosvd.weights.random_weights import build_demo, build_synthetic

GAP_US = 2.0


def gaps(trace: dict) -> dict:
    """The idle time between a Chrome trace's GPU kernels, as the module's docstring says."""
    events = trace["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    if not kernels:
        return {"kernels": 0}
    launches = {e["args"].get("correlation"): e for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    cpu = sorted((e for e in events if e.get("cat") in ("cpu_op", "user_annotation")
                  and e.get("ph") == "X"), key=lambda e: e["ts"])
    starts = [e["ts"] for e in cpu]

    def launcher(kernel: dict) -> str:
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        if launch is None:
            return "(no launch found)"
        best = None  # the innermost CPU event around the launch
        for e in cpu[max(0, bisect.bisect_right(starts, launch["ts"]) - 400):
                     bisect.bisect_right(starts, launch["ts"])]:
            if e["ts"] <= launch["ts"] <= e["ts"] + e["dur"] and (best is None or e["dur"] < best["dur"]):
                best = e
        return best["name"][:90] if best else "(outside any op)"

    first, last = kernels[0]["ts"], kernels[-1]["ts"] + kernels[-1]["dur"]
    busy = sum(k["dur"] for k in kernels)
    by_launcher = collections.defaultdict(lambda: [0.0, 0])
    by_place = collections.Counter()
    for prev, k in zip(kernels, kernels[1:]):
        gap = k["ts"] - (prev["ts"] + prev["dur"])
        if gap <= GAP_US:
            continue
        row = by_launcher[launcher(k)]
        row[0] += gap
        row[1] += 1
        at = k["ts"] - first
        by_place["first 5 ms" if at < 5000 else "last 5 ms" if last - k["ts"] < 5000 else "between"] += gap
    top = sorted(by_launcher.items(), key=lambda kv: -kv[1][0])[:25]
    return {"kernels": len(kernels), "span_ms": (last - first) / 1e3, "kernel_ms": busy / 1e3,
            "gap_ms": sum(v[0] for v in by_launcher.values()) / 1e3,
            "gap_by_place_ms": {k: v / 1e3 for k, v in by_place.items()},
            "gap_by_launcher": [{"launcher": n, "ms": v[0] / 1e3, "gaps": v[1]} for n, v in top]}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gaps.json"))
    parser.add_argument("--steps", type=int, default=4,
                        help="steps a generation (at least 3: the third is profiled)")
    add_shape_arguments(parser)
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps must be at least 3 (two steps run before the profiled one)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    shape = ProbeShape.from_args(args)
    cuda, device, frames = shape.cuda, shape.device, shape.frames
    height, width = shape.height, shape.width
    if cuda:  # the fast path as the server runs it, its blocks saved as the server saves them
        cache = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bentosvd-inductor-"))
        gen = VideoGenerator(build_synthetic(frames, device), device, Speedups.fast(),
                             compiled_blocks.folder(cache))
    else:
        gen = VideoGenerator(build_demo(frames), device, Speedups())
    settings = bench_generation(frames, args.steps, 1)
    image = bench_image(height, width)
    sync = torch.cuda.synchronize if cuda else lambda: None
    t0 = time.perf_counter()
    gen.generate(image, settings, decode=False)  # compiles (or loads) the blocks
    result = {**shape.header(),
              "command": command("benchmarks.probes.gaps", argv), "first_call_s": round(time.perf_counter() - t0, 1)}
    marks = []

    def on_step(i, n):  # as the server's worker: after the step's GPU work
        marks.append(time.perf_counter())
        prof.step()

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, schedule=schedule(wait=2, warmup=0, active=1, repeat=1)) as prof:
        gen.generate(image, settings, decode=False, on_step=on_step)
    result["profiled_step_s"] = marks[2] - marks[1]
    # Unprofiled, for comparison: the generation with and without the wait after each step.
    for name, callback in (("with_step_callback_s", lambda i, n: None), ("without_s", None)):
        sync()
        t0 = time.perf_counter()
        gen.generate(image, settings, decode=False, on_step=callback)
        sync()
        result[f"generate_{args.steps}_steps_{name}"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        trace_path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace_path))
        trace = json.loads(trace_path.read_text())
        with open(trace_path, "rb") as src, gzip.open(args.out.with_suffix(".trace.json.gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    result.update(gaps(trace))
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
