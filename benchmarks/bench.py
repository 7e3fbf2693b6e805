"""Benchmark: vanilla diffusers vs. BentoSVD's pipeline vs. the real server, in one run.

    python -m benchmarks.bench                       # GPU: full-size synthetic SVD-XT
    python -m benchmarks.bench --model demo          # CPU: the demo model (what CI runs)
    python -m benchmarks.bench --variant svd_xt_turbo  # the turbo variant, its authors' defaults

(a) vanilla `StableVideoDiffusionPipeline` as the blog called it; (b) the project's
pipeline in each speed/memory mode, per phase, with peak memory, achieved TFLOP/s and
per-frame PSNR against eager; (c) `bentoml serve` end to end (POST /generate → MP4 bytes),
with time to ready on a cold and a warm compile cache. Prints a table, writes JSON and,
with --markdown, the table and the command as markdown beside it: a run that the journal
(docs/journal.md) cites keeps both in benchmarks/results/. Phases are timed by
synchronising the device around the pipeline's own methods, which the benchmark wraps.
Each pipeline mode gets fresh copies of the models, so no mode inherits another's
speed-ups.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bentosvd.config import VARIANTS, Settings
from bentosvd.media.streaming_encode import StreamingEncode
from bentosvd.media.video import encode_mp4
from bentosvd.protocol import GenerationSettings, OutputSpec
from bentosvd.svd import compiled_blocks
from bentosvd.svd.generator import VideoGenerator, sync
from bentosvd.svd.speedups import Speedups
from bentosvd.weights.random_weights import build_demo, build_synthetic

ROOT = Path(__file__).resolve().parent.parent
# The pipeline modes the benchmark can time on a GPU (--modes), in the default order.
MODES = {
    "fast": Speedups.fast(),  # the default on CUDA: torch.compile of the UNet's blocks and the VAE's decoder
    "low_memory": Speedups.low_memory_mode(),
    "fp8": replace(Speedups.fast(), fp8=True),
    "fast_eager_vae": replace(Speedups.fast(), compile_vae=False),  # the decoder eager
    # every cross-attention computed in full (the default up to run l)
    "fast_full_cross_attention": replace(Speedups.fast(), single_token_cross_attention=False),
    "fast_in_process": replace(Speedups.fast(), save_compiled=False),  # blocks compiled in-process
    # the temporal self-attention on cuDNN's kernel too (the default up to run z)
    "fast_cudnn_temporal_attention": replace(Speedups.fast(), efficient_temporal_attention=False),
    # the temporal convolutions as the Conv3d layers they are declared as (the default up to
    # 2026-11-28's run m)
    "fast_conv3d": replace(Speedups.fast(), frame_conv=False),
    # NCHW between the UNet's compiled blocks (the default up to 2026-11-28's run q)
    "fast_nchw_blocks": replace(Speedups.fast(), channels_last_blocks=False),
    "fast_whole": replace(Speedups.fast(), compile_regions=False),  # the UNet as one graph
    "fp8_eager": Speedups(fp8=True),
    # Step caching (bentosvd/svd/stepcache.py): changes the output, its PSNR is the deviation.
    "step_cache2": replace(Speedups.fast(), step_cache=2),
    "step_cache3": replace(Speedups.fast(), step_cache=3),
    # ... with the steps between running only the last 2 or 1 layers of the outermost level
    "step_cache3_layers2": replace(Speedups.fast(), step_cache=3, step_cache_layers=2),
    "step_cache3_layers1": replace(Speedups.fast(), step_cache=3, step_cache_layers=1),
    "step_cache2_layers1": replace(Speedups.fast(), step_cache=2, step_cache_layers=1),
    "fp8_step_cache3": replace(Speedups.fast(), fp8=True, step_cache=3),
    "eager": Speedups(),
}
# Modes that claim the same output as eager fp16 must stay this close to it on every frame
# (fp16 rounding differences land at 60+ dB; a real change of the output far below 40).
PSNR_TOLERANCE_DB = 40.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Lowest per-frame PSNR (dB) between two uint8 videos; inf when identical."""
    worst = math.inf
    for fa, fb in zip(a.astype(np.float64), b.astype(np.float64)):
        mse = np.mean((fa - fb) ** 2)
        worst = min(worst, math.inf if mse == 0 else 10 * math.log10(255**2 / mse))
    return worst


def count_flops(unet, vae, settings: GenerationSettings, height: int, width: int) -> dict:
    """FLOPs of one UNet forward (the guidance batch of 2; 1 without guidance, as diffusers
    runs max_guidance_scale 1) and of the whole VAE decode."""
    dev, dtype = unet.device, unet.dtype
    f, h, w = settings.num_frames, height // 8, width // 8
    n = 2 if settings.max_guidance_scale > 1 else 1
    with torch.no_grad(), FlopCounterMode(display=False) as unet_count:
        unet(torch.randn(n, f, unet.config.in_channels, h, w, device=dev, dtype=dtype),
             torch.tensor(1.0, device=dev),
             encoder_hidden_states=torch.randn(n, 1, unet.config.cross_attention_dim, device=dev, dtype=dtype),
             added_time_ids=torch.randn(n, 3, device=dev, dtype=dtype))
    chunk = settings.decode_chunk_size
    kwargs = {"num_frames": chunk} if "num_frames" in vae.forward.__code__.co_varnames else {}
    with torch.no_grad(), FlopCounterMode(display=False) as vae_count:
        vae.decode(torch.randn(chunk, 4, h, w, device=dev, dtype=dtype), **kwargs)
    return {"unet_forward": unet_count.get_total_flops(),
            "vae_decode": vae_count.get_total_flops() * f / chunk}


def run_once(gen: VideoGenerator, image: np.ndarray, settings: GenerationSettings) -> dict:
    device = gen.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    timings = {}
    # Encoded as the server encodes by default: chunk by chunk while the video is decoded,
    # so video_encode is what is left of it after the last frame.
    encoder = StreamingEncode((settings.num_frames, *image.shape[:2], 3),
                              OutputSpec(format="mp4", fps=settings.fps),
                              crf=Settings.model_fields["video_crf"].default,
                              preset=Settings.model_fields["video_preset"].default)
    try:
        frames = gen.generate(image, settings, timings=timings, on_frames=encoder.add)
    except BaseException:
        encoder.close()  # nobody will wait for this video
        raise
    sync(device)
    total = time.perf_counter() - start
    start = time.perf_counter()
    mp4 = encoder.result()
    encode = time.perf_counter() - start
    phases = {"image_encode": timings["image_encode"], "vae_decode": timings["vae_decode"],
              "video_encode": encode}
    phases["unet_steps"] = total - phases["image_encode"] - phases["vae_decode"]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"seconds": total + encode, "generate_s": total, "phases": phases,
            "peak_gib": peak, "frames": frames, "mp4_bytes": len(mp4)}


def measure(gen, image, settings, repeats: int) -> dict:
    """Warm up once (compiles, allocator), then the median of `repeats` runs."""
    start = time.perf_counter()
    first = run_once(gen, image, settings)
    first_s = time.perf_counter() - start
    runs = [run_once(gen, image, settings) for _ in range(repeats)]
    best = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    best["first_call_s"] = first_s
    best["all_s"] = [r["seconds"] for r in runs]
    best["peak_gib"] = max([r["peak_gib"] or 0 for r in runs + [first]]) or None
    return best


# Kernel name patterns → what the kernel does, checked in this order (cuDNN's and cuBLAS's
# kernel names on Hopper, Triton's from Inductor; CPU op names for the CPU run).
KERNEL_KINDS = [
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("fused pointwise/reduction (Triton)", ("triton_poi", "triton_per", "triton_red")),
    # cuDNN's own layout changes around a convolution whose input is not channels-last
    ("convolution layout transpose", ("nchwtonhwc", "nhwctonchw")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "cudnn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "addmm", "aten::mm", "aten::bmm", "triton_tem")),
    ("norm", ("norm",)),
    ("copy", ("memcpy", "memset", "copy", "aten::cat")),
]


def kernel_kind(name: str) -> str:
    lower = name.lower()
    for kind, patterns in KERNEL_KINDS:
        if any(p in lower for p in patterns):
            return kind
    return "other"


def profile_step(gen: VideoGenerator, image: np.ndarray, settings: GenerationSettings) -> dict:
    """The device's kernels during one denoising step (the second of three), by kind and
    the top ones, and how busy the device was: what holds the UNet back."""
    from torch.profiler import ProfilerActivity, profile, schedule

    on_gpu = gen.device.type == "cuda"
    marks = []

    def on_step(i, n):  # after each step, device synchronised
        marks.append(time.perf_counter())
        prof.step()

    activities = [ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with profile(activities=activities, schedule=schedule(wait=1, warmup=0, active=1, repeat=1)) as prof:
        gen.generate(image, settings.model_copy(update={"num_inference_steps": 3}), on_step=on_step)
    wall = marks[1] - marks[0]
    kernels = {}
    for e in prof.key_averages():
        if on_gpu and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = (e.self_device_time_total if on_gpu else e.self_cpu_time_total) / 1e6
        if t > 0 and not e.key.startswith("ProfilerStep"):
            kernels[e.key] = (t, e.count)
    busy = sum(t for t, _ in kernels.values())
    by_kind: dict[str, float] = {}
    for name, (t, _) in kernels.items():
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + t
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:15]
    result = {
        "step_wall_s": wall, "kernel_s": busy, "device_busy": busy / wall if on_gpu else None,
        "by_kind_s": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "top_kernels": [{"name": n[:160], "seconds": t, "calls": c, "kind": kernel_kind(n)}
                        for n, (t, c) in top],
    }
    print("profile of one step:", json.dumps({k: v for k, v in result.items() if k != "top_kernels"}),
          flush=True)
    return result


def vanilla(parts: dict, image: np.ndarray, settings: GenerationSettings, device, repeats: int) -> dict:
    """Plain diffusers as the seeds call it: PIL in, PIL frames out, then exported."""
    from diffusers import StableVideoDiffusionPipeline
    from PIL import Image

    pipe = StableVideoDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    pil = Image.fromarray(image)
    times, peak = [], 0.0
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        generator = torch.Generator(device).manual_seed(settings.seed)
        # The turbo sampler's re-noising draws from it too (diffusers' step() gets no
        # generator; the authors' app seeds torch's global one), as in VideoGenerator.
        pipe.scheduler.generator = generator
        frames = pipe(pil, height=image.shape[0], width=image.shape[1],
                      num_frames=settings.num_frames,
                      num_inference_steps=settings.num_inference_steps,
                      min_guidance_scale=settings.min_guidance_scale,
                      max_guidance_scale=settings.max_guidance_scale, fps=settings.fps,
                      motion_bucket_id=settings.motion_bucket_id,
                      noise_aug_strength=settings.noise_aug_strength,
                      decode_chunk_size=settings.decode_chunk_size, generator=generator).frames[0]
        encode_mp4(np.stack([np.asarray(f) for f in frames]), settings.fps)
        sync(device)
        times.append(time.perf_counter() - start)
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated(device) / 2**30)
    runs = sorted(times[1:])
    return {"seconds": runs[len(runs) // 2], "all_s": times[1:], "peak_gib": peak or None,
            "frames": np.stack([np.asarray(f) for f in frames])}


def bench_generation(frames: int, steps: int, decoding_t: int, guidance=(1.0, 3.0),
                     motion_bucket_id: int = 127) -> GenerationSettings:
    """The generation every benchmark and probe times: guidance 1.0 -> 3.0 (a turbo
    variant: its own, with its motion), seed 0."""
    return GenerationSettings(
        num_frames=frames, num_inference_steps=steps, min_guidance_scale=guidance[0],
        max_guidance_scale=guidance[1], fps=7, motion_bucket_id=motion_bucket_id,
        noise_aug_strength=0.02, decode_chunk_size=decoding_t, seed=0)


def bench_image(height: int, width: int) -> np.ndarray:
    """The input image every benchmark and probe uses: uint8 noise, seed 0."""
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def generation(args) -> GenerationSettings:
    """What (a), (b) and (c) generate: for SVD's variants the benchmark's own generation
    (guidance 1.0 -> 3.0, motion 127), which every past run used; for a turbo variant its
    authors' guidance and motion. Steps and frames: --steps, --frames."""
    variant = VARIANTS[args.variant]
    if variant.sampler == "euler":
        return bench_generation(args.frames, args.steps, args.decoding_t)
    return bench_generation(args.frames, args.steps, args.decoding_t,
                            (variant.min_guidance_scale, variant.max_guidance_scale),
                            variant.motion_bucket_id)


def served_variant(args) -> str:
    """The MODEL_VERSION the server benchmark registers and serves: --variant, or with the
    demo model the demo of the same sampler (`demo`, `demo_turbo`)."""
    if args.model != "demo":
        return args.variant
    sampler = VARIANTS[args.variant].sampler
    return next(v.name for v in VARIANTS.values() if v.demo and v.sampler == sampler)


def server_params(args) -> dict:
    """The `params` of every request the server benchmark sends: the same generation as (b)
    (the variant's own defaults may differ: SVD-XT's are 30 steps)."""
    job = generation(args)
    return {"seed": job.seed, "decoding_t": job.decode_chunk_size, "num_frames": job.num_frames,
            "num_inference_steps": job.num_inference_steps,
            "min_guidance_scale": job.min_guidance_scale,
            "max_guidance_scale": job.max_guidance_scale, "motion_bucket_id": job.motion_bucket_id}


def bench_pipeline(args, device, dtype, save=lambda r: None) -> dict:
    variant_frames, sampler = args.frames, VARIANTS[args.variant].sampler
    if args.model == "demo":
        parts = build_demo(variant_frames, sampler=sampler)
    else:
        parts = build_synthetic(variant_frames, device=device, dtype=dtype, sampler=sampler)
    parts = {k: (v.to(device, dtype) if isinstance(v, torch.nn.Module) else v) for k, v in parts.items()}
    image = bench_image(args.height, args.width)
    settings = generation(args)
    result = {"settings": settings.model_dump(), "height": args.height, "width": args.width}
    save(result)

    result["vanilla"] = vanilla(parts, image, settings, device, args.repeats)
    # Vanilla's frames are eager fp16's (tests/test_fidelity.py shows they are identical).
    reference = result["vanilla"].pop("frames")
    print(f"vanilla: {result['vanilla']['seconds']:.2f} s", flush=True)
    save(result)

    flops = count_flops(parts["unet"], parts["vae"], settings, args.height, args.width)
    result["flops"] = flops
    modes = {name: MODES[name] for name in args.modes} if device.type == "cuda" else {"eager": Speedups()}
    if device.type != "cuda" and args.profile:
        args.profile = ["eager"]
    result["modes"] = {}
    for name, speedups in modes.items():
        gen = r = None
        try:
            # Compiled blocks kept inside Inductor's cache, as the server keeps them.
            gen = VideoGenerator(fresh(parts), device, speedups,
                                 compiled_blocks.folder(os.environ["TORCHINDUCTOR_CACHE_DIR"]))
            r = measure(gen, image, settings, args.repeats)
            if name in args.profile:
                r["profile"] = profile_step(gen, image, settings)
        except Exception as e:  # one failing mode must not lose the others' numbers
            result["modes"][name] = {"error": repr(e)}
            print(f"{name}: FAILED {e!r}", flush=True)
        gen = None  # its copies of the models go (outside the except: its traceback holds them)
        forget(device)
        if name in result["modes"]:
            continue
        frames = r.pop("frames")
        r["psnr_vs_eager_db"] = psnr(frames, reference)
        r["equivalent_to_eager"] = r["psnr_vs_eager_db"] >= PSNR_TOLERANCE_DB
        # The whole UNet's FLOPs (as diffusers runs it) over the steps' time; not for step
        # caching, whose cached steps run only part of it (run r's 890 "TFLOP/s" were that).
        r["unet_tflops"] = None if speedups.step_cache else (
            flops["unet_forward"] * settings.num_inference_steps / r["phases"]["unet_steps"] / 1e12)
        r["speedup_vs_vanilla"] = result["vanilla"]["seconds"] / r["seconds"]
        result["modes"][name] = r
        save(result)
        print(f"{name}: {r['seconds']:.2f} s ({r['speedup_vs_vanilla']:.2f}x), "
              f"peak {r['peak_gib']} GiB, PSNR {r['psnr_vs_eager_db']:.1f} dB"
              + ("" if r["equivalent_to_eager"] else f" BELOW THE {PSNR_TOLERANCE_DB} dB TOLERANCE"),
              flush=True)
    if args.sweep:
        result["sweep"] = sweep(parts, image, settings, device, args)
    return result


def fresh(parts: dict) -> dict:
    """Copies of the models for one generator: a speed-up patches, compiles, quantizes or
    offloads the modules it is given in place, so each mode starts from untouched ones and
    the benchmark needs to know none of them (the processors and scheduler are shared)."""
    return {k: copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v for k, v in parts.items()}


def forget(device) -> None:
    """After a generator is dropped: its models (held in reference cycles by the wrappers
    the speed-ups install), their compiled code and the cached memory go with it."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sweep(parts, image, settings, device, args) -> list[dict]:
    """How time grows with frames, steps and resolution (eager, so no compiling; 1 run each)."""
    speedups = Speedups()
    rows = []
    h, w = image.shape[:2]
    cases = [("frames", {"num_frames": n}) for n in sorted({14, settings.num_frames})]
    cases += [("steps", {"num_inference_steps": n}) for n in (max(2, settings.num_inference_steps // 2),)]
    for name, change in cases:
        gen = VideoGenerator(fresh(parts), device, speedups)
        chunk = min(settings.decode_chunk_size, change.get("num_frames", 99))
        r = run_once(gen, image, settings.model_copy(update={**change, "decode_chunk_size": chunk}))
        rows.append({"vary": name, **change, "height": h, "width": w, "seconds": r["seconds"],
                     "unet_steps_s": r["phases"]["unet_steps"]})
        gen = None
        forget(device)
    for scale in (0.5,):
        small = image[: int(h * scale) // 64 * 64, : int(w * scale) // 64 * 64]
        gen = VideoGenerator(fresh(parts), device, speedups)
        r = run_once(gen, np.ascontiguousarray(small), settings)
        rows.append({"vary": "resolution", "height": small.shape[0], "width": small.shape[1],
                     "seconds": r["seconds"], "unet_steps_s": r["phases"]["unet_steps"]})
        gen = None
        forget(device)
    for row in rows:
        print("sweep", row, flush=True)
    return rows


# ---------------------------------------------------------------- the real server


def free_port() -> int:
    """A port no server listens on: a server left running by an earlier run (killed
    before it could stop its server) must not answer in place of the one being timed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("server not ready")


def post_image(url: str, png: bytes, params: dict) -> tuple[float, int, object, bytes]:
    """POST /generate; (seconds, status, headers (case-insensitive), body), whatever the status."""
    boundary = "bentosvdbench"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"img\"; filename=\"i.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n"
            f"{json.dumps(params)}\r\n--{boundary}--\r\n").encode()
    req = urllib.request.Request(f"{url}/generate", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=900) as r:
            status, headers, data = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, headers, data = e.code, e.headers, e.read()
    return time.perf_counter() - start, status, headers, data


def parse_server_timing(header: str | None) -> dict:
    """`a;dur=12.5, b;dur=3` → {"a": 0.0125, "b": 0.003} (seconds)."""
    phases = {}
    for item in (header or "").split(","):
        name, _, dur = item.strip().partition(";dur=")
        if name and dur:
            phases[name] = float(dur) / 1000
    return phases


def burst(url: str, png: bytes, params: dict, n: int, latency: float) -> dict:
    """n requests at once: each worker encodes a video while its GPU already runs the
    next request, so n take less than n times one request's latency. Past what the server
    holds (its GPU workers plus MAX_QUEUE waiting) it answers 429 at once: counted as
    rejected, as a client would see them; any other status fails the run."""
    from concurrent.futures import ThreadPoolExecutor

    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(lambda i: post_image(url, png, {**params, "seed": i}), range(n)))
    wall = time.perf_counter() - start
    statuses = [a[1] for a in answers]
    assert set(statuses) <= {200, 429}, statuses
    served = sorted(a[0] for a in answers if a[1] == 200)
    result = {"requests": n, "served": len(served), "rejected": statuses.count(429),
              "wall_s": wall, "per_request_s": wall / max(1, len(served)),
              "requests_per_minute": 60 * len(served) / wall,
              "vs_sequential": len(served) * latency / wall, "latencies_s": served}
    print("burst:", result, flush=True)
    return result


def oom_check(url: str, png: bytes) -> dict:
    """A real CUDA out-of-memory in the server: take all but 1 GiB of the GPU's free memory
    in this process, ask for a full-batch decode (decoding_t = all frames, ~20 GiB more),
    expect 503 + Retry-After; give the memory back; the next request must succeed and
    /livez stay 200."""
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(max(0, free - 2**30), dtype=torch.uint8, device="cuda")
    try:
        _, status, headers, body = post_image(url, png, {"seed": 1, "decoding_t": 25})
    finally:
        del hog
        torch.cuda.empty_cache()
    live_after_fault = urllib.request.urlopen(f"{url}/livez", timeout=10).status
    seconds, next_status, _, data = post_image(url, png, {"seed": 2, "decoding_t": 1})
    live = urllib.request.urlopen(f"{url}/livez", timeout=10).status
    result = {"oom_status": status, "retry_after": headers.get("Retry-After"),
              "oom_message": body[:300].decode(errors="replace"),
              "livez_after_fault": live_after_fault, "next_status": next_status,
              "next_is_mp4": data[4:8] == b"ftyp", "next_seconds": seconds, "livez_after": live}
    result["passed"] = (status == 503 and result["retry_after"] is not None and next_status == 200
                        and result["next_is_mp4"] and live == 200)
    print("oom check:", result, flush=True)
    return result


def bench_server(args, save=lambda r: None) -> dict:
    """Register the model, serve it, time requests; restart to time a warm compile cache."""
    import io

    from PIL import Image

    work = Path(tempfile.mkdtemp(prefix="bentosvd-bench-"))
    server_env = dict(args.server_env)
    env = {**os.environ, "BENTOML_HOME": str(work / "home"), "BENTOML_DO_NOT_TRACK": "true",
           "COMPILE_CACHE_DIR": os.environ["TORCHINDUCTOR_CACHE_DIR"],
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "WARMUP": json.dumps(args.server_warmup), **server_env}
    variant = served_variant(args)
    cmd = [sys.executable, "import_model.py", "--variant", variant]
    if args.model == "synthetic":
        cmd.append("--synthetic")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    out = done.stdout
    env["MODEL_VERSION"] = variant
    if args.model == "synthetic":
        env["MODEL_TAG"] = out.split("MODEL_TAG=")[1].split()[0]
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)).save(buf, "PNG")
    params = server_params(args)
    result = {}
    for start_kind in args.server_starts:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = work / f"{start_kind}.log"
        log = log_path.open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "service:svc",
                                 "--host", "127.0.0.1", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            ready = wait_ready(url, proc, args.ready_timeout)
            latencies, timings = [], []
            for _ in range(args.repeats + 1):
                seconds, status, headers, data = post_image(url, buf.getvalue(), params)
                assert status == 200 and data[4:8] == b"ftyp", f"{status}: {data[:300]!r}"
                latencies.append(seconds)
                timings.append(parse_server_timing(headers.get("Server-Timing")))
            result[start_kind] = {"ready_s": ready,
                                  "startup": startup_phases(log_path.read_text(errors="replace")),
                                  "first_request_s": latencies[0],
                                  "latency_s": statistics.median(latencies[1:]),
                                  # Ready should mean fast: the first request after
                                  # /readyz over the median of the next ones.
                                  "first_over_next": latencies[0] / statistics.median(latencies[1:]),
                                  "all_s": latencies[1:], "server_timing": timings[1:],
                                  "warmup": args.server_warmup, "env": server_env}
            if args.server_burst and start_kind == args.server_starts[0]:
                result[start_kind]["burst"] = burst(url, buf.getvalue(), params, args.server_burst,
                                                    result[start_kind]["latency_s"])
            if args.oom_check and "oom_check" not in result:
                result["oom_check"] = oom_check(url, buf.getvalue())
            save(result)
            print(f"server ({start_kind}): ready in {ready:.1f} s, "
                  f"latency {result[start_kind]['latency_s']:.2f} s, first request "
                  f"{result[start_kind]['first_over_next']:.2f}x the next", flush=True)
        finally:
            # Kept beside the JSON: its timestamps show where a start spends its time. Copied
            # before the server stops too, which can take up to a minute a run may not have.
            kept = args.out.with_name(f"{args.out.stem}-{start_kind}.log")
            shutil.copy(log_path, kept)
            os.killpg(proc.pid, 15)
            try:
                # BentoML took a minute to stop a GPU server that had compiled (run t), time
                # a run may not have: what is timed is the start, not the stop.
                proc.wait(20)
            except subprocess.TimeoutExpired:  # a stuck shutdown must not lose the numbers
                os.killpg(proc.pid, 9)
                proc.wait()
            log.close()
            shutil.copy(log_path, kept)
            if proc.returncode not in (0, -15):
                print(log_path.read_text()[-3000:])
    return result


def startup_phases(log: str) -> dict:
    """Where a server start went, from its worker's log lines: seconds to import torch and
    diffusers, to load the model, and to warm up each orientation. Kept in the JSON, so a
    run cut short before the log is copied still says it."""
    phases = {}
    if m := re.search(r"imported torch and diffusers in ([\d.]+) s", log):
        phases["imported_s"] = float(m[1])
    if m := re.search(r"\] loaded .* in ([\d.]+) s with", log):
        phases["loaded_s"] = float(m[1])
    warmed = {k: float(v) for k, v in re.findall(r"warmed up (\w+) \(\d+x\d+\) in ([\d.]+) s", log)}
    if warmed:
        phases["warmed_s"] = warmed
    return phases


# ---------------------------------------------------------------- report


def command(module: str, argv: list[str] | None) -> str:
    """How to run it again: `python -m <module> <its arguments>` (sys.argv under -m names
    the file instead)."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def environment(device, argv: list[str] | None = None) -> dict:
    import diffusers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "device": str(device),
           "command": command("benchmarks.bench", argv)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def table(result: dict) -> str:
    if "pipeline" not in result:
        return "\n".join(f"server, {k}: ready {r['ready_s']:.1f} s{_startup(r)}, latency {r['latency_s']:.2f} s"
                         for k, r in result.get("server", {}).items() if k != "oom_check")
    vanilla_s = result["pipeline"]["vanilla"]["seconds"]
    lines = ["| run | seconds | vs vanilla | image encode | UNet steps | VAE decode | video encode | peak GiB | UNet TFLOP/s | min PSNR vs eager |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| (a) vanilla diffusers | {vanilla_s:.2f} | 1.00× | | | | | "
             f"{_num(result['pipeline']['vanilla']['peak_gib'])} | | |"]
    for name, r in result["pipeline"]["modes"].items():
        if "error" in r:
            lines.append(f"| (b) {name} | failed: {r['error'][:80]} | | | | | | | | |")
            continue
        p = r["phases"]
        lines.append(f"| (b) {name} | {r['seconds']:.2f} | {r['speedup_vs_vanilla']:.2f}× | "
                     f"{p['image_encode']:.2f} | {p['unet_steps']:.2f} | {p['vae_decode']:.2f} | "
                     f"{p['video_encode']:.2f} | {_num(r['peak_gib'])} | {_num(r['unet_tflops'])} | "
                     f"{_num(r['psnr_vs_eager_db'])} |")
    for kind, r in result.get("server", {}).items():
        if kind == "oom_check":
            continue
        lines.append(f"| (c) server, {kind.replace('_', ' ')}: ready {r['ready_s']:.1f} s"
                     f"{_startup(r)} | {r['latency_s']:.2f} | "
                     f"{vanilla_s / r['latency_s']:.2f}× | | | | | | | |")
    return "\n".join(lines)


def _startup(server_start: dict) -> str:
    """Where a start's time went, as far as the worker's log said: " (imports 14.3 s, ...)"."""
    phases = server_start.get("startup", {})
    parts = [f"{name} {phases[key]:.1f} s" for name, key in (("imports", "imported_s"), ("load", "loaded_s"))
             if key in phases]
    parts += [f"warm-up {shape} {seconds:.1f} s" for shape, seconds in phases.get("warmed_s", {}).items()]
    return f" ({', '.join(parts)})" if parts else ""


def _num(x) -> str:
    if x is None:
        return "–"
    return "identical" if x == math.inf else f"{x:.1f}"


def parse_args(argv=None, device: torch.device | None = None) -> argparse.Namespace:
    """The options, with the defaults that depend on the device and the variant filled in."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["synthetic", "demo"], default=None,
                        help="default: synthetic on CUDA, demo on CPU")
    parser.add_argument("--variant", default="svd_xt",
                        choices=[name for name, v in VARIANTS.items() if not v.demo],
                        help="the architecture and sampler (the weights stay random); "
                        "svd_xt_turbo: AnimateLCM's sampler at its authors' defaults")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--decoding-t", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", nargs="*", default=["fast", "low_memory", "fp8", "fast_eager_vae"],
                        choices=list(MODES), help="pipeline modes to time on a GPU, in this order")
    parser.add_argument("--profile", nargs="*", default=[], choices=list(MODES),
                        help="profile one denoising step of these modes (kernels by kind, device "
                        "busy share); on the CPU, the eager demo")
    parser.add_argument("--sweep", action="store_true", help="also vary frames, steps, resolution")
    parser.add_argument("--server", action="store_true", help="also benchmark bentoml serve end to end")
    parser.add_argument("--server-only", action="store_true", help="only the server benchmark")
    parser.add_argument("--server-starts", nargs="+", default=["cold_cache", "warm_cache"],
                        choices=["cold_cache", "warm_cache"],
                        help="server starts to time; with TORCHINDUCTOR_CACHE_DIR set to the cache "
                        "the pipeline benchmark filled, the first start already finds it warm")
    parser.add_argument("--server-warmup", nargs="+", default=["landscape", "portrait"],
                        choices=["landscape", "portrait"], help="the server's WARMUP shapes")
    parser.add_argument("--server-env", nargs="+", default=[], metavar="NAME=VALUE",
                        type=lambda kv: tuple(kv.split("=", 1)),
                        help="settings for the benchmarked server, e.g. STEP_CACHE=3")
    parser.add_argument("--server-burst", type=int, default=0, metavar="N",
                        help="also send N requests at once and time them (encode/generate overlap)")
    parser.add_argument("--oom-check", action="store_true",
                        help="GPU: force a real CUDA out-of-memory in the server and check it recovers")
    parser.add_argument("--ready-timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    parser.add_argument("--markdown", "--docs", type=Path, nargs="?", const=True, default=None,
                        metavar="PATH", help="also write the table and the command as markdown "
                        "(default path: --out's, ending in .md)")
    args = parser.parse_args(argv)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.model = args.model or ("synthetic" if device.type == "cuda" else "demo")
    demo = args.model == "demo"
    variant = VARIANTS[args.variant]
    args.frames = args.frames or VARIANTS["demo" if demo else "svd_xt"].num_frames
    # A turbo variant at its authors' step count; SVD's at the benchmark's own.
    args.steps = args.steps or (variant.num_inference_steps if variant.sampler != "euler"
                                else 8 if demo else 25)
    args.height = args.height or (144 if demo else 576)
    args.width = args.width or (256 if demo else 1024)
    args.decoding_t = min(args.decoding_t, args.frames)
    return args


def main(argv=None) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = parse_args(argv, device)
    # Killed by `timeout` or a scheduler: stop the way Ctrl+C does, so the server being
    # timed (in a process group of its own) is stopped too and the numbers so far are kept.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    # One compile cache for the pipeline modes and the server: a fresh one unless given.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bentosvd-inductor-"))

    result = {"environment": environment(device, argv), "model": args.model,
              "variant": served_variant(args)}
    if not args.server_only:
        result["pipeline"] = bench_pipeline(args, device, dtype, save=lambda r: save(args.out, {**result, "pipeline": r}))
        save(args.out, result)
    if args.server or args.server_only:
        result["server"] = bench_server(args, save=lambda r: save(args.out, {**result, "server": r}))
        save(args.out, result)
    report = table(result)
    print(report)
    if args.markdown:
        path = args.out.with_suffix(".md") if args.markdown is True else args.markdown
        write_markdown(path, result, report)
    return 0


def save(path: Path, result: dict) -> None:
    """Written after every step, so a run cut short still leaves its numbers."""
    path.write_text(json.dumps(result, indent=2, default=str))


def write_markdown(path: Path, result: dict, report: str) -> None:
    """The run as a results file: what ran where, the command, then the table. Kept beside
    its JSON in benchmarks/results/ when the journal cites the run."""
    env = result["environment"]
    lines = [f"# {result['model']} model ({result.get('variant', 'svd_xt')}) on {env.get('gpu', 'CPU')}", "",
             f"    {env['command']}", "",
             f"torch {env['torch']}, diffusers {env['diffusers']}, Python {env['python']}"]
    if "pipeline" in result:
        pipeline = result["pipeline"]
        lines[-1] += (f"; {pipeline['height']}×{pipeline['width']}, "
                      f"{json.dumps(pipeline['settings'])}")
    path.write_text("\n".join(lines) + f"\n\n{report}\n")


if __name__ == "__main__":
    sys.exit(main())
