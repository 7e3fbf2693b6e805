"""How fast is a request of a shape the server did not warm up?

    python -m benchmarks.probes.fallback --out $OUT/fallback.json      # on the GPU machine,
                                                                        # after scripts/device_bench.sh

A request whose shape is not in `WARMUP` (or of another frame count) runs the models
eagerly instead of compiling for minutes inside the request (`VideoGenerator._compiled_for`).
This builds the full-size synthetic SVD-XT once and, for each variant, a `VideoGenerator`
as the server builds it (blocks saved under a fresh cache folder) that is told no shape
may compile any more, so every block runs eagerly:

- `eager`: plain eager diffusers (no speed-ups), the reference;
- `fast`: the fast path's eager fallback (activations left as each eager block makes
  them; run t, with the convolution weights channels-last, was 12% slower a step);
- `fast_nchw_blocks`: the same without `channels_last_blocks`.

For each: a guided step (the median of the steps after the first), the decode, the whole
generation (25 frames, 576x1024, --steps steps, `decoding_t` 1; the median of --repeats
after one warm-up) and the lowest per-frame PSNR against plain eager. Runs 2026-11-28 t and
v (H200) are in benchmarks/results/. Without a GPU it runs the same on the CPU with the
tiny demo model: a check of the probe, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench import bench_generation, bench_image, command, forget, fresh, psnr
from benchmarks.probes import ProbeShape, add_shape_arguments
from bentosvd.protocol import GenerationSettings
from bentosvd.svd.generator import VideoGenerator
from bentosvd.svd.speedups import Speedups
from bentosvd.weights.random_weights import build_demo, build_synthetic

VARIANTS = {
    "eager": ("eager (no speed-ups)", Speedups()),
    "fast": ("fast path, shape not warmed (channels-last blocks)", Speedups.fast()),
    "fast_nchw_blocks": ("fast path, shape not warmed, NCHW blocks",
                         replace(Speedups.fast(), channels_last_blocks=False)),
}


def timed(gen: VideoGenerator, image: np.ndarray, settings: GenerationSettings) -> tuple[dict, np.ndarray]:
    marks, timings = [], {}
    sync = torch.cuda.synchronize if gen.device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    frames = gen.generate(image, settings, timings=timings,
                          on_step=lambda i, n: marks.append(time.perf_counter()))
    sync()
    return {"seconds": time.perf_counter() - start,
            "step_s": statistics.median(b - a for a, b in zip(marks, marks[1:])),
            "vae_decode_s": timings["vae_decode"]}, frames


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("fallback.json"))
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (at least 2)")
    add_shape_arguments(parser)
    parser.add_argument("--repeats", type=int, default=2, help="timed generations after the warm-up")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (a step's time is between two steps)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    shape = ProbeShape.from_args(args)
    cuda, device, frames = shape.cuda, shape.device, shape.frames
    height, width = shape.height, shape.width
    parts = build_synthetic(frames, device) if cuda else build_demo(frames)
    settings = bench_generation(frames, args.steps, 1)
    image = bench_image(height, width)
    result = {**shape.header(),
              "steps": args.steps, "command": command("benchmarks.probes.fallback", argv), "variants": {}}
    reference = None
    for name in args.variants:
        what, speedups = VARIANTS[name]
        gen = VideoGenerator(fresh(parts), device, speedups, cache_dir=Path(tempfile.mkdtemp()))
        gen.compile_new_shapes = False  # as after the warm-up: no shape is compiled
        timed(gen, image, settings)
        runs = [timed(gen, image, settings) for _ in range(args.repeats)]
        row = {"what": what, **{k: statistics.median(r[k] for r, _ in runs) for k in runs[0][0]}}
        if reference is None:
            reference = runs[0][1]
        row["min_psnr_db_vs_first"] = psnr(runs[0][1], reference)
        if gen.saved_regions is not None:
            row["saved_region_counts"] = dict(gen.saved_regions.counts)  # nothing built
        result["variants"][name] = row
        print(name, json.dumps(row), flush=True)
        args.out.write_text(json.dumps(result, indent=1))
        gen = None
        forget(device)
    return result


if __name__ == "__main__":
    main()
