"""How long FP8 (torchao) takes to compile into the fast path's UNet, and what one guided
step then costs (GPU only; run on the device machine after `source scripts/device_bench.sh`):

    python3 docs/bench/fp8_probe.py $OUT/fp8.json

The benchmark's `fp8` mode never finished its first generation inside a 10-minute call
(run i), so this probe compiles one UNet step alone and prints as it goes: when each of
the UNet's levels first runs (the compile reaches it), then step times. Its first run
(n, docs/BENCHMARKS.md) found why: torchao's quantize_ had switched on Inductor's
coordinate-descent tuning for the whole process, and even the fp16 UNet compiled after it
took minutes per level; quantize_fp8 now leaves Inductor's settings alone. On synthetic
full-size SVD-XT weights (fp16, 576x1024, 25 frames, batch 2 for guidance), the UNet as
the fast path runs it (single-token cross-attention, compiled block by block):
- fp16, as the reference (its kernels come from the compile cache when the benchmark ran
  first);
- FP8 weights and activations in the transformer blocks' linear layers (`quantize_fp8`).
Medians of CUDA-event timings; the JSON file is rewritten after every result.
"""

import copy
import json
import sys
import time

import torch

from bentosvd.weights.random_weights import build_synthetic
from bentosvd.svd.accel.cross_attention import use_single_token_cross_attention
from bentosvd.svd.accel.fp8 import quantize_fp8
from bentosvd.svd.compiled_blocks import UNET_REGIONS, compile_regions
from kernels_probe import timed  # beside this file

results: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
OUT = sys.argv[1] if len(sys.argv) > 1 else "fp8.json"
START = time.perf_counter()


def record(name, value):
    results[name] = value
    print(f"[{time.perf_counter() - START:6.1f} s] {name} {value}", flush=True)
    with open(OUT, "w") as f:
        json.dump(results, f, indent=1)


def announce_levels(unet, tag):
    """Print when each level of the UNet first runs (its blocks compile on first use)."""
    handles = []
    levels = [*(f"down{i}" for i in range(len(unet.down_blocks))), "mid",
              *(f"up{i}" for i in range(len(unet.up_blocks)))]
    for name, block in zip(levels, [*unet.down_blocks, unet.mid_block, *unet.up_blocks]):
        handles.append(block.register_forward_pre_hook(
            lambda *_, name=name: print(f"[{time.perf_counter() - START:6.1f} s] {tag}: {name} starts",
                                        flush=True)))
    return handles


@torch.no_grad()
def main() -> None:
    parts = build_synthetic(25, device="cuda", dtype=torch.float16)
    fp16 = parts["unet"]
    fp8 = copy.deepcopy(fp16)
    quantize_fp8(fp8, torch.device("cuda"))
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(2, 25, 8, 72, 128, device="cuda", dtype=torch.half, generator=gen)
    t = torch.tensor(700.0, device="cuda")
    e = torch.randn(2, 1, 1024, device="cuda", dtype=torch.half, generator=gen)
    a = torch.tensor([[6.0, 127.0, 0.02]] * 2, device="cuda", dtype=torch.half)
    outputs = {}
    for tag, unet in (("fp16", fp16), ("fp8", fp8)):
        use_single_token_cross_attention(unet)
        compile_regions(unet, UNET_REGIONS, None)
        step = lambda: unet(x, t, encoder_hidden_states=e, added_time_ids=a, return_dict=False)[0]
        handles = announce_levels(unet, tag)
        started = time.perf_counter()
        outputs[tag] = step().float()
        torch.cuda.synchronize()
        record(f"{tag}_compile_first_call_s", time.perf_counter() - started)
        for h in handles:
            h.remove()
        record(f"{tag}_step_s", timed(step))
    diff = outputs["fp8"] - outputs["fp16"]
    record("fp8_vs_fp16_relative_rms", float(diff.pow(2).mean().sqrt() / outputs["fp16"].pow(2).mean().sqrt()))
    record("peak_gib", torch.cuda.max_memory_allocated() / 2**30)


if __name__ == "__main__":
    main()
