"""Does the VAE decode faster with several frames per decoder call while still decoding each
frame on its own? GPU only (after `source scripts/device_bench.sh`):

    python3 docs/bench/decode_batch_probe.py $OUT/decode_batch.json

At `decoding_t` 1 (the default) diffusers calls SVD's temporal decoder once per frame,
`vae.decode(z[i:i+1], num_frames=1)`: 25 calls of batch 1. The same decoder given k frames
as k clips of one frame (`vae.decode(z[i:i+k], num_frames=1)`: its temporal layers mix
frames within a clip only) computes the same frames, with larger kernels. On the
full-size synthetic VAE (fp16, the decoder compiled as the fast path compiles it, random
latents for 25 frames of 576x1024): the 25 frames' decode time for each k in BATCHES
(CUDA events, median of 5), the peak GPU memory of the decode, and the largest
difference from k = 1's frames.
"""

import json
import sys
import time

import torch
from cuda_timing import timed_ms

from bentosvd.weights.random_weights import build_synthetic

BATCHES = [1, 2, 3, 5]


@torch.no_grad()
def main(path: str) -> None:
    parts = build_synthetic(25, "cuda")
    vae = parts["vae"]
    del parts
    torch.cuda.empty_cache()
    z = torch.randn(25, 4, 72, 128, device="cuda", dtype=torch.half,
                    generator=torch.Generator("cuda").manual_seed(0)) / vae.config.scaling_factor

    def decode(k: int) -> torch.Tensor:
        return torch.cat([vae.decode(z[i:i + k], num_frames=1).sample for i in range(0, 25, k)])

    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "batches": {}}
    for compiled in (False, True):
        if compiled:
            vae.decoder.compile(dynamic=False)
        reference = None
        for k in BATCHES:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = decode(k)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ms = timed_ms(lambda: decode(k), repeats=5, warmup=1)
            row = {"ms": round(ms, 1), "first_call_s": round(first, 1),
                   "peak_above_weights_gib": round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)}
            if reference is None:
                reference = out
            row["max_diff_vs_k1"] = float((out.float() - reference.float()).abs().max())
            results["batches"][f"{'compiled' if compiled else 'eager'} k={k}"] = row
            print("compiled" if compiled else "eager", k, row, flush=True)
            with open(path, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
