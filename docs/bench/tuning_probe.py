"""Would Inductor's own tuning make the exact fast path's UNet step faster, and what would
it cost to compile? (GPU only; on the device machine after `source scripts/device_bench.sh`):

    python3 docs/bench/tuning_probe.py $OUT/tuning.json [seconds]   # per block
    python3 docs/bench/tuning_probe.py $OUT/layout.json layout      # whole step

One guided step (batch 2 x 25 frames, 576x1024, synthetic full-size SVD-XT, fp16, the
single-token cross-attention) runs eagerly once, and a hook on each UNet block
(`UNET_REGIONS`, what the fast path compiles one by one) keeps one block and its inputs per
(class, configuration, input shapes), with how many of the step's blocks share them. Then,
heaviest first, each such block is compiled the way `bentosvd.svd.compiled_blocks` compiles it
(fullgraph, dynamic=False, Dynamo reset before each) under each of these Inductor option
sets, and timed (CUDA events, median of 5):

- default: what the fast path uses;
- coordinate_descent: Inductor benchmarks neighbouring launch configurations of every
  generated kernel (`coordinate_descent_tuning`);
- max_autotune: Triton templates for the matrix products and convolutions benchmarked
  against cuBLAS/cuDNN, which lets a product absorb the pointwise work after it (the
  GEGLU, bias and residual adds), plus coordinate descent;
- layout: Inductor's channels-last layout forced on (`force_layout_optimization`; blocks
  with convolutions only), for cuDNN's NCHW<->NHWC transposes (17 ms a step in run s).

Each result has the compile's seconds, the block's milliseconds and its largest deviation
from the eager output. Results are written after every block, so a run cut short by the
call's limit keeps what it measured; no new compile starts after `seconds` (default 420).
`layout` instead times the whole step compiled block by block as the fast path does, then
again with the residual blocks compiled with Inductor's channels-last layout forced on,
with each one's largest kernels (cuDNN's transposes among them) and deviation; and the
VAE's decoder on one frame (as `decoding_t=1` runs it) compiled both ways.

Without a GPU it runs the tiny demo model on the CPU (a dry run of the script, not a
measurement).
"""

import json
import sys
import time

import torch
from cuda_timing import timed_ms as timed

from bentosvd.weights.random_weights import build_demo, build_synthetic
from bentosvd.svd.accel.cross_attention import use_single_token_cross_attention
from bentosvd.svd.compiled_blocks import UNET_REGIONS
from bentosvd.svd.compiled_blocks import _describe, _hash, _structure

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

OPTION_SETS = {
    "default": {},
    "coordinate_descent": {"coordinate_descent_tuning": True},
    "max_autotune": {"max_autotune": True, "coordinate_descent_tuning": True},
    "layout": {"force_layout_optimization": True},
}




def clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(clone(v) for v in value)
    if isinstance(value, dict):
        return {k: clone(v) for k, v in value.items()}
    return value


def first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        return next(t for t in map(first_tensor, value) if t is not None)
    return getattr(value, "sample", None)


def capture(unet) -> list[dict]:
    """One eager guided step; one entry per distinct (block configuration, inputs)."""
    seen: dict[str, dict] = {}

    def hook(module, args, kwargs):
        key = _hash(repr((_structure(module), _describe(args), _describe(sorted(kwargs.items())))))
        if key not in seen:
            seen[key] = {"block": module, "args": clone(args), "kwargs": clone(kwargs), "count": 0,
                         "name": f"{type(module).__name__} {tuple(first_tensor(args).shape)}"}
        seen[key]["count"] += 1

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True)
               for m in unet.modules() if type(m).__name__ in UNET_REGIONS]
    x, t, e, a = step_inputs(unet)
    unet(x, t, encoder_hidden_states=e, added_time_ids=a, return_dict=False)
    for h in handles:
        h.remove()
    return list(seen.values())


def step_inputs(unet) -> tuple:
    """One guided step's UNet inputs: batch 2 x frames, 576x1024 (8x8 latents on the CPU)."""
    config, dtype = unet.config, unet.dtype
    size = (72, 128) if CUDA else (8, 8)
    gen = torch.Generator(DEVICE).manual_seed(0)
    x = torch.randn(2, config.num_frames, config.in_channels, *size, device=DEVICE, dtype=dtype,
                    generator=gen)
    t = torch.tensor(700.0, device=DEVICE)
    e = torch.randn(2, 1, config.cross_attention_dim, device=DEVICE, dtype=dtype, generator=gen)
    a = torch.tensor([[6.0, 127.0, 0.02]] * 2, device=DEVICE, dtype=dtype)
    return x, t, e, a


@torch.no_grad()
def main(out: str, budget_s: float) -> None:
    started = time.perf_counter()
    parts = build_synthetic(25, device="cuda") if CUDA else build_demo(4)
    unet = parts["unet"]
    use_single_token_cross_attention(unet)
    blocks = capture(unet)
    results = {"gpu": torch.cuda.get_device_name() if CUDA else "cpu (demo model)", "torch": torch.__version__,
               "option_sets": OPTION_SETS, "blocks": []}
    for b in blocks:
        eager = lambda b=b: type(b["block"]).forward(b["block"], *b["args"], **b["kwargs"])
        b["reference"] = first_tensor(eager()).float()
        b["eager_ms"] = timed(eager)
    blocks.sort(key=lambda b: -b["eager_ms"] * b["count"])
    results["eager_blocks_ms"] = sum(b["eager_ms"] * b["count"] for b in blocks)
    print(f"{len(blocks)} distinct blocks, eager {results['eager_blocks_ms']:.1f} ms a step", flush=True)
    for b in blocks:
        row = {"block": b["name"], "count": b["count"], "eager_ms": round(b["eager_ms"], 3)}
        results["blocks"].append(row)
        has_conv = any(isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)) for m in b["block"].modules())
        for name, options in OPTION_SETS.items():
            if time.perf_counter() - started > budget_s:
                row[name] = "not run: out of time"
                continue
            if name == "layout" and not has_conv:
                continue
            if any(not hasattr(torch._inductor.config, k) for k in options):
                row[name] = "not run: this torch has no such option"
                continue
            torch._dynamo.reset()
            fn = torch.compile(type(b["block"]).forward, fullgraph=True, dynamic=False,
                               options=options)
            call = lambda: fn(b["block"], *b["args"], **b["kwargs"])
            t0 = time.perf_counter()
            try:
                output = first_tensor(call()).float()
                if CUDA:
                    torch.cuda.synchronize()
            except Exception as e:  # a failed option set is a result too
                row[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
                continue
            row[name] = {"compile_s": round(time.perf_counter() - t0, 1),
                         "ms": round(timed(call), 3),
                         "max_abs_diff": float((output - b["reference"]).abs().max())}
            print(b["name"], b["count"], name, row[name], flush=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    summary(results)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


@torch.no_grad()
def layout(out: str) -> None:
    """The whole step, default against the residual blocks' layout forced to channels-last."""
    from torch.profiler import ProfilerActivity, profile
    # As the fast path does: past Dynamo's default of 8 versions a block runs eagerly (run x's
    # probe did, for part of its step).
    torch._dynamo.config.recompile_limit = 128
    parts = build_synthetic(25, device="cuda") if CUDA else build_demo(4)
    unet = parts["unet"]
    use_single_token_cross_attention(unet)
    x, t, e, a = step_inputs(unet)
    step = lambda: unet(x, t, encoder_hidden_states=e, added_time_ids=a, return_dict=False)[0]
    results = {"gpu": torch.cuda.get_device_name() if CUDA else "cpu (demo model)",
               "torch": torch.__version__}
    reference = step().float()
    for name, options in (("default", {}), ("layout", {"force_layout_optimization": True})):
        torch._dynamo.reset()
        for m in unet.modules():
            if type(m).__name__ == "TransformerSpatioTemporalModel":
                m.compile(dynamic=False)
            elif type(m).__name__ == "SpatioTemporalResBlock":
                m.compile(dynamic=False, options=options)
        t0 = time.perf_counter()
        output = step().float()
        row = {"compile_s": round(time.perf_counter() - t0, 1), "ms": round(timed(step), 2),
               "max_abs_diff": float((output - reference).abs().max())}
        activities = [ProfilerActivity.CUDA] if CUDA else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            step()
            if CUDA:
                torch.cuda.synchronize()
        attr = "device_time_total" if CUDA else "cpu_time_total"
        kernels = sorted(((e.key[:120], round(getattr(e, attr) / 1000, 3), e.count)
                          for e in prof.key_averages() if getattr(e, attr) > 0), key=lambda r: -r[1])
        row["kernels_ms_calls"] = kernels[:40]
        row["transposes_ms"] = round(sum(ms for k, ms, _ in kernels if "nchwToNhwc" in k or "nhwcToNchw" in k), 3)
        results[name] = row
        print(name, {k: v for k, v in row.items() if k != "kernels_ms_calls"}, flush=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    # The VAE's decoder, one frame as decoding_t=1 decodes it (25 times a request).
    vae = parts["vae"]
    z = torch.randn(1, 4, *((72, 128) if CUDA else (8, 8)), device=DEVICE, dtype=vae.dtype)
    decode = lambda: vae.decode(z, num_frames=1).sample
    reference = decode().float()
    for name, options in (("default", {}), ("layout", {"force_layout_optimization": True})):
        torch._dynamo.reset()
        vae.decoder.compile(dynamic=False, options=options)
        t0 = time.perf_counter()
        output = decode().float()
        row = {"compile_s": round(time.perf_counter() - t0, 1), "ms": round(timed(decode), 2),
               "max_abs_diff": float((output - reference).abs().max())}
        results[f"decoder_{name}"] = row
        print(f"decoder_{name}", row, flush=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=1)


def summary(results: dict) -> None:
    """Per option set, over the blocks measured with both it and the default: the step's
    milliseconds in those blocks, and the compile seconds."""
    print(f"\n== {results['gpu']}, torch {results['torch']} ==")
    for name in OPTION_SETS:
        rows = [r for r in results["blocks"]
                if isinstance(r.get(name), dict) and isinstance(r.get("default"), dict)]
        if not rows:
            continue
        base = sum(r["default"]["ms"] * r["count"] for r in rows)
        tuned = sum(r[name]["ms"] * r["count"] for r in rows)
        compile_s = sum(r[name]["compile_s"] for r in rows)
        results.setdefault("summary", {})[name] = {
            "blocks": len(rows), "default_ms": round(base, 2), "ms": round(tuned, 2),
            "compile_s": round(compile_s, 1)}
        print(f"{name:20s} {len(rows):3d} blocks: {base:8.2f} -> {tuned:8.2f} ms a step "
              f"({tuned / base:.3f}x), compiled in {compile_s:.0f} s")


if __name__ == "__main__":
    if sys.argv[2:3] == ["layout"]:
        layout(sys.argv[1])
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "tuning.json",
             float(sys.argv[2]) if len(sys.argv) > 2 else 420)
