"""Do the UNet's blocks run faster when the activations stay channels-last between them?
GPU only (after `source scripts/device_bench.sh`):

    python3 docs/bench/layout_probe.py $OUT/layout.json

Run p's trace (2026-11-28) shows the fast path's ResNet blocks opening with a Triton kernel
(group norm, SiLU) that writes its input again, transposed, for cuDNN's channels-last
convolution: up to 3.5 ms for a [50, 960, 72, 128] input that a plain pass reads and writes
in about 0.6 ms. The blocks are compiled one by one, and torch.compile gives each block's
output the strides eager PyTorch would: contiguous NCHW (the transformer blocks end in
`.contiguous()`), so every block starts from NCHW again.

This compiles the UNet's blocks in the process (as `compile_regions` does; the decoder
stays eager) twice on the full-size synthetic SVD-XT: as the fast path did before run q,
then with `channels_last_blocks` (`bentosvd/svd/accel/channels_last.py`: each block's output made
channels-last inside its compiled code, so Inductor writes it that way to begin with, and
the UNet's 2-D convolution weights channels-last, so that the eager layers between the
blocks, conv_in and the up/down-sampling convolutions, hand on channels-last too; run q
patched the block classes' forward in the probe itself to the same effect). Since run u
the weights are a variant of their own: `channels_last_blocks` leaves them NCHW (the
samplers' convolutions return the layout of their input), the third variant makes them
channels-last as run q did. ONLY=1,2 runs just those two (run u). For each: a
guided step's time (the median of the 4 steps after the first of a 5-step generation),
its kernels by kind (benchmarks.bench.profile_step), and that generation's video, compared
by its lowest per-frame PSNR.
"""

import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.bench import bench_generation, bench_image, profile_step, psnr, undo
from bentosvd.weights.random_weights import build_synthetic
from bentosvd.svd.accel.channels_last import use_channels_last_weights
from bentosvd.svd.generator import VideoGenerator
from bentosvd.svd.speedups import Speedups

NCHW = replace(Speedups.fast(), save_compiled=False, compile_vae=False, channels_last_blocks=False)
# name -> (speedups, whether the UNet's 2-D convolution weights are made channels-last too)
VARIANTS = {
    "fast (NCHW between the blocks)": (NCHW, False),
    "channels-last between the blocks": (replace(NCHW, channels_last_blocks=True), False),
    "channels-last between the blocks, channels-last weights": (
        replace(NCHW, channels_last_blocks=True), True),
}
ONLY = os.environ.get("ONLY")  # a comma-separated list of variant numbers, from 0


def main(path: str) -> None:
    device = torch.device("cuda")
    parts = build_synthetic(25, device)
    settings = bench_generation(25, 5, 1)
    image = bench_image(576, 1024)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "variants": {}}
    reference = None
    for number, (name, (speedups, cl_weights)) in enumerate(VARIANTS.items()):
        if ONLY and str(number) not in ONLY.split(","):
            continue
        gen = VideoGenerator(parts, device, speedups)
        if cl_weights:
            use_channels_last_weights(parts["unet"])
        t0 = time.perf_counter()
        gen.generate(image, replace(settings, num_inference_steps=1), decode=False)
        row = {"first_call_s": round(time.perf_counter() - t0, 1)}
        marks = []
        torch.cuda.synchronize()
        frames = gen.generate(image, settings, on_step=lambda i, n: marks.append(time.perf_counter()))
        row["step_s"] = statistics.median(b - a for a, b in zip(marks, marks[1:]))
        if reference is None:
            reference = frames
        row["min_psnr_db_vs_first"] = psnr(frames, reference)
        row["profile"] = profile_step(gen, image, settings)
        result["variants"][name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
        Path(path).write_text(json.dumps(result, indent=1))
        undo(gen, parts, speedups, device)  # also the weights' layout
        del gen
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1])
