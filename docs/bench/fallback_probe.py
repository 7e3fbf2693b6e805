"""How fast is a request of a shape the server did not warm up? GPU only (after
`source scripts/device_bench.sh`):

    python3 docs/bench/fallback_probe.py $OUT/fallback.json

A request whose shape is not in `WARMUP` (or of another frame count) runs the models
eagerly instead of compiling for minutes inside the request (`VideoGenerator._compiled_for`).
This builds the full-size synthetic SVD-XT once and, for each variant, a `VideoGenerator`
as the server builds it (blocks saved under a fresh cache folder) that is told no shape
may compile any more, so every block runs eagerly:

- plain eager diffusers (no speedups);
- the fast path's eager fallback. In run t (H200, 2026-11-28) `channels_last_blocks`
  still made the UNet's convolution weights channels-last and each block hand its output
  on channels-last, eagerly too; since run v the weights stay NCHW and an eager block's
  output is left as it is;
- the same without `channels_last_blocks`.

For each: a guided step (the median of the steps after the first), the decode, the whole
generation (25 frames, 576x1024, STEPS steps, `decoding_t` 1; the median of 2 after one
warm-up) and the lowest per-frame PSNR against plain eager. Without a GPU it runs the
same on the CPU with the tiny demo model, a check of the probe itself, not a measurement.
"""

import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench import bench_generation, bench_image, psnr, undo
from bentosvd.weights.random_weights import build_demo, build_synthetic
from bentosvd.protocol import GenerationSettings
from bentosvd.svd.generator import VideoGenerator
from bentosvd.svd.speedups import Speedups

VARIANTS = {
    "eager (no speedups)": Speedups(),
    "fast path, shape not warmed (channels-last blocks)": Speedups.fast(),
    "fast path, shape not warmed, NCHW blocks": replace(Speedups.fast(), channels_last_blocks=False),
}
STEPS = int(os.environ.get("STEPS", "10"))


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


def main(path: str) -> None:
    if torch.cuda.is_available():
        device, parts, size = torch.device("cuda"), build_synthetic(25, "cuda"), (576, 1024)
    else:
        device, parts, size = torch.device("cpu"), build_demo(25), (64, 64)
    settings = bench_generation(25, STEPS, 1)
    image = bench_image(*size)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {"gpu": gpu, "torch": torch.__version__, "steps": STEPS, "variants": {}}
    reference = None
    for name, speedups in VARIANTS.items():
        gen = VideoGenerator(parts, device, speedups, cache_dir=Path(tempfile.mkdtemp()))
        gen.compile_new_shapes = False  # as after the warm-up: no shape is compiled
        timed(gen, image, settings)
        runs = [timed(gen, image, settings) for _ in range(2)]
        row = {k: statistics.median(r[k] for r, _ in runs) for k in runs[0][0]}
        frames = runs[0][1]
        if reference is None:
            reference = frames
        row["min_psnr_db_vs_eager"] = psnr(frames, reference)
        if gen.saved_regions is not None:
            row["saved_region_counts"] = dict(gen.saved_regions.counts)  # nothing built
        result["variants"][name] = row
        print(name, json.dumps(row), flush=True)
        Path(path).write_text(json.dumps(result, indent=1))
        undo(gen, parts, speedups, device)
        del gen
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1])
