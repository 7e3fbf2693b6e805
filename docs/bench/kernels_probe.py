"""Where the exact fast path still loses time, per component (GPU only; run on the device
machine after `source scripts/device_bench.sh`):

    python3 docs/bench/kernels_probe.py $OUT/kernels.json [unet]

(`unet`: only the UNet step, as the fast path runs it now.)

Measures, on synthetic full-size SVD-XT weights (fp16, 576x1024, 25 frames):
- the temporal VAE decoding one frame (what decoding_t=1 does 25 times): eager, with
  cuDNN's autotuner (torch.backends.cudnn.benchmark), channels_last, compiled, and five
  frames in one call as five one-frame videos (the same arithmetic per frame);
- one guided UNet step (batch 2 x 25 frames) compiled block by block, with the
  single-token cross-attention (since run s; run h computed it in full), with and without
  cuDNN's autotuner, and its top kernels;
- the temporal Conv3d (3,1,1) alone, on the permuted layout the UNet hands it and on a
  contiguous one.
Medians of CUDA-event timings after warm-up; a JSON file and a table at the end.
"""

import json
import sys
import time

import torch
from cuda_timing import timed_ms

from bentosvd.weights.random_weights import build_synthetic
from bentosvd.svd.accel.cross_attention import use_single_token_cross_attention
from bentosvd.svd.compiled_blocks import UNET_REGIONS, compile_regions

results: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}


def timed(fn, repeats=5, warmup=2) -> float:
    """Median seconds (CUDA events)."""
    return timed_ms(fn, repeats, warmup) / 1000



def top_kernels(fn, n=25) -> list:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 1e6, e.count) for e in prof.key_averages()
            if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    return [{"total_s": total}] + [{"name": k[:150], "s": round(s, 5), "calls": c} for k, s, c in rows[:n]]


def record(name, value):
    results[name] = value
    print(name, json.dumps(value) if not isinstance(value, float) else round(value, 4), flush=True)


@torch.no_grad()
def main(out: str, unet_only: bool = False) -> None:
    t0 = time.perf_counter()
    parts = build_synthetic(25, device="cuda", dtype=torch.float16)
    unet, vae = parts["unet"], parts["vae"]
    record("build_s", time.perf_counter() - t0)
    gen = torch.Generator("cuda").manual_seed(0)
    if not unet_only:
        components(vae, gen)
    unet_step(unet, gen)
    record("peak_gib", torch.cuda.max_memory_allocated() / 2**30)

    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print("\n== summary ==")
    for k, v in results.items():
        if isinstance(v, float):
            print(f"{k:50s} {v:.4f}")


def components(vae, gen) -> None:
    """The VAE decoder's variants and the convolutions (see the module's docstring)."""
    # --- VAE, one frame as decoding_t=1 decodes it ---
    z1 = torch.randn(1, 4, 72, 128, device="cuda", dtype=torch.half, generator=gen)
    z5 = torch.randn(5, 4, 72, 128, device="cuda", dtype=torch.half, generator=gen)
    decode1 = lambda: vae.decode(z1, num_frames=1).sample
    decode5 = lambda: vae.decode(z5, num_frames=1).sample
    torch.backends.cudnn.benchmark = False
    reference = decode1().float()
    record("vae_frame_eager_s", timed(decode1))
    torch.backends.cudnn.benchmark = True
    record("vae_frame_eager_cudnn_benchmark_s", timed(decode1))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    record("vae_5frames_as_5videos_per_frame_s", timed(decode5) / 5)
    record("vae_5frames_peak_extra_gib", (torch.cuda.max_memory_allocated() - base) / 2**30)
    torch.cuda.reset_peak_memory_stats()
    decode1()
    record("vae_1frame_peak_extra_gib", (torch.cuda.max_memory_allocated() - base) / 2**30)
    record("vae_frame_eager_kernels", top_kernels(decode1, 20))
    for m in vae.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.to(memory_format=torch.channels_last)
    record("vae_frame_channels_last_cudnn_benchmark_s", timed(decode1))
    for m in vae.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.to(memory_format=torch.contiguous_format)
    vae.decoder.compile(dynamic=False)
    t0 = time.perf_counter()
    compiled = decode1().float()
    torch.cuda.synchronize()
    record("vae_compile_first_call_s", time.perf_counter() - t0)
    record("vae_compiled_max_abs_diff", float((compiled - reference).abs().max()))
    record("vae_frame_compiled_cudnn_benchmark_s", timed(decode1))
    torch.backends.cudnn.benchmark = False
    record("vae_frame_compiled_s", timed(decode1))
    record("vae_frame_compiled_kernels", top_kernels(decode1, 20))
    del z5

    # --- the temporal Conv3d alone (level 0 of the UNet) ---
    conv = torch.nn.Conv3d(320, 320, (3, 1, 1), padding=(1, 0, 0), device="cuda", dtype=torch.half)
    x_bf = torch.randn(2, 25, 320, 72, 128, device="cuda", dtype=torch.half, generator=gen)
    x_perm = x_bf.permute(0, 2, 1, 3, 4)
    x_cont = x_perm.contiguous()
    for bench in (False, True):
        torch.backends.cudnn.benchmark = bench
        tag = "_cudnn_benchmark" if bench else ""
        record(f"conv3d_permuted{tag}_s", timed(lambda: conv(x_perm)))
        record(f"conv3d_contiguous{tag}_s", timed(lambda: conv(x_cont)))
    conv2 = torch.nn.Conv2d(320, 320, 3, padding=1, device="cuda", dtype=torch.half)
    x2 = torch.randn(50, 320, 72, 128, device="cuda", dtype=torch.half, generator=gen)
    record("conv2d_3x3_level0_cudnn_benchmark_s", timed(lambda: conv2(x2)))
    torch.backends.cudnn.benchmark = False
    record("conv2d_3x3_level0_s", timed(lambda: conv2(x2)))
    del x_bf, x_perm, x_cont, x2


def unet_step(unet, gen) -> None:
    """One guided UNet step, as the default fast path runs it."""
    use_single_token_cross_attention(unet)
    compile_regions(unet, UNET_REGIONS, None)
    x = torch.randn(2, 25, 8, 72, 128, device="cuda", dtype=torch.half, generator=gen)
    t = torch.tensor(700.0, device="cuda")
    e = torch.randn(2, 1, 1024, device="cuda", dtype=torch.half, generator=gen)
    a = torch.tensor([[6.0, 127.0, 0.02]] * 2, device="cuda", dtype=torch.half)
    step = lambda: unet(x, t, encoder_hidden_states=e, added_time_ids=a, return_dict=False)[0]
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    record("unet_compile_first_call_s", time.perf_counter() - t0)
    record("unet_step_compiled_s", timed(step))
    torch.backends.cudnn.benchmark = True
    record("unet_step_compiled_cudnn_benchmark_s", timed(step))
    record("unet_step_compiled_cudnn_benchmark_kernels", top_kernels(step, 30))
    torch.backends.cudnn.benchmark = False
    record("unet_step_compiled_kernels", top_kernels(step, 30))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "kernels.json", "unet" in sys.argv[2:])
