"""Is FlashAttention 4 (the flash-attn-4 package, CuTe DSL; its Hopper kernel follows
FlashAttention 3's design) faster than cuDNN's fused attention, which the fast path gets on
Hopper, for SVD-XT's self-attention? GPU only, with flash-attn-4 and its dependencies on
PYTHONPATH:

    python3 docs/bench/attention_probe.py $OUT/attention.json

The shapes of a guided step (batch 2 x 25 frames, 576x1024, 64 channels a head): the
spatial self-attention at the UNet's four levels (9216, 2304, 576 and 144 tokens) and
the temporal one (25 frames at each position), each with how many layers a step runs.
Queries, keys and values are laid out as diffusers hands them to
`scaled_dot_product_attention` (batch, heads, tokens, channels, transposed from the
projection's output). Each backend is timed (CUDA events, median of 10) and compared
with cuDNN's output; FA4 both through torch's own switch
(`torch.nn.attention.activate_flash_attention_impl("FA4")`, then SDPA's flash backend, also
inside torch.compile) and called directly on the projection's layout. `SHAPES=temporal`
keeps the shapes whose names start so; the temporal ones also try the memory-efficient
kernel and the plain arithmetic compiled by Inductor.

    python3 docs/bench/attention_probe.py $OUT/block.json block

compiles the UNet's outermost transformer block ahead of time as the fast path does,
with its temporal self-attention on cuDNN's kernel and on the memory-efficient one
(`bentosvd.svd.accel.temporal_attention`), and times both; `step` does the same for a whole guided
step compiled block by block.
"""

import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from cuda_timing import timed_ms
from torch.nn.attention import SDPBackend, sdpa_kernel

# (name, batch, heads, tokens, layers a step)
SHAPES = [
    ("spatial 72x128", 50, 5, 9216, 5),
    ("spatial 36x64", 50, 10, 2304, 5),
    ("spatial 18x32", 50, 20, 576, 5),
    ("spatial 9x16", 50, 20, 144, 1),
    ("temporal 72x128", 2 * 9216, 5, 25, 5),
    ("temporal 36x64", 2 * 2304, 10, 25, 5),
    ("temporal 18x32", 2 * 576, 20, 25, 5),
    ("temporal 9x16", 2 * 144, 20, 25, 1),
]


def timed(fn, repeats=10, warmup=3) -> float:
    return timed_ms(fn, repeats, warmup)



def sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def fa4_direct(q, k, v):
    from flash_attn.cute import flash_attn_func
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    out = out[0] if isinstance(out, tuple) else out
    return out.transpose(1, 2)


@torch.no_grad()
def main(out: str) -> None:
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": []}
    try:
        import flash_attn.cute
        results["flash_attn_cute"] = getattr(flash_attn.cute, "__version__", "?")
    except Exception as e:
        results["flash_attn_cute"] = f"import failed: {type(e).__name__}: {e}"
    backends = {"cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "flash2": sdpa(SDPBackend.FLASH_ATTENTION),
                "fa4_direct": fa4_direct}
    # For the temporal attention's 25 tokens only: kernels with smaller tiles, and the
    # plain arithmetic (two batched products and a softmax) compiled by Inductor.
    short = {"efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
             "math_compiled": torch.compile(sdpa(SDPBackend.MATH), dynamic=False)}
    gen = torch.Generator("cuda").manual_seed(0)
    inputs = {}
    shapes = [s for s in SHAPES if s[0].startswith(os.environ.get("SHAPES", ""))]
    for name, batch, heads, tokens, layers in shapes:
        # The projection's output (batch, tokens, heads x 64), viewed as diffusers does.
        qkv = [torch.randn(batch, tokens, heads * 64, device="cuda", dtype=torch.half, generator=gen)
               .view(batch, tokens, heads, 64).transpose(1, 2) for _ in range(3)]
        inputs[name] = qkv
    for name, batch, heads, tokens, layers in shapes:
        q, k, v = inputs[name]
        flops = 4 * batch * heads * tokens * tokens * 64
        row = {"shape": name, "batch": batch, "heads": heads, "tokens": tokens, "layers": layers}
        reference = backends["cudnn"](q, k, v).float()
        for backend, fn in {**backends, **(short if tokens <= 64 else {})}.items():
            try:
                t0 = time.perf_counter()
                output = fn(q, k, v)
                torch.cuda.synchronize()
                first_s = time.perf_counter() - t0
                ms = timed(lambda: fn(q, k, v))
                row[backend] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1),
                                "first_call_s": round(first_s, 2),
                                "max_abs_diff": float((output.float() - reference).abs().max())}
            except Exception as e:
                row[backend] = f"failed: {type(e).__name__}: {str(e)[:300]}"
            print(name, backend, row[backend], flush=True)
        results["shapes"].append(row)
        with open(out, "w") as f:
            json.dump(results, f, indent=1)

    # FA4 through torch's switch: SDPA's flash backend, eager and compiled.
    try:
        torch.nn.attention.activate_flash_attention_impl("FA4")
        flash = sdpa(SDPBackend.FLASH_ATTENTION)
        compiled = torch.compile(flash, dynamic=False)
        for row in results["shapes"]:
            q, k, v = inputs[row["shape"]]
            reference = backends["cudnn"](q, k, v).float()
            for backend, fn in (("fa4_sdpa", flash), ("fa4_sdpa_compiled", compiled)):
                try:
                    output = fn(q, k, v)
                    ms = timed(lambda: fn(q, k, v))
                    row[backend] = {"ms": round(ms, 4),
                                    "max_abs_diff": float((output.float() - reference).abs().max())}
                except Exception as e:
                    row[backend] = f"failed: {type(e).__name__}: {str(e)[:300]}"
                print(row["shape"], backend, row[backend], flush=True)
        torch.nn.attention.restore_flash_attention_impl()
    except Exception as e:
        results["fa4_sdpa"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
        print("fa4_sdpa", results["fa4_sdpa"], flush=True)

    print(f"\n== {results['gpu']}, torch {results['torch']}: ms a guided step ==")
    for backend in ["cudnn", "flash2", "efficient", "math_compiled", "fa4_direct", "fa4_sdpa",
                    "fa4_sdpa_compiled"]:
        rows = [r for r in results["shapes"] if isinstance(r.get(backend), dict)]
        if rows:
            total = sum(r[backend]["ms"] * r["layers"] for r in rows)
            results.setdefault("step_ms", {})[backend] = round(total, 2)
            print(f"{backend:20s} {total:8.2f} ms over {len(rows)} of {len(shapes)} shapes")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


@torch.no_grad()
def block(out: str) -> None:
    """The UNet's outermost transformer block (5 of them a step), compiled ahead of time as
    the fast path does (`SavedRegions`), with its temporal self-attention on cuDNN's kernel
    and on the memory-efficient one (`bentosvd.svd.accel.temporal_attention`): milliseconds, the
    attention kernels that ran, how it was compiled, and the outputs' difference."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    from bentosvd.weights.random_weights import build_synthetic
    from bentosvd.svd.accel.cross_attention import use_single_token_cross_attention
    from bentosvd.svd.compiled_blocks import SavedRegions
    from bentosvd.svd.accel.temporal_attention import use_efficient_temporal_attention

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tuning_probe import step_inputs

    unet = build_synthetic(25, device="cuda")["unet"]
    use_single_token_cross_attention(unet)
    target = unet.down_blocks[0].attentions[0]
    captured = {}
    handle = target.register_forward_pre_hook(
        lambda m, args, kwargs: captured.setdefault("call", (args, kwargs)), with_kwargs=True)
    x, t, e, a = step_inputs(unet)
    unet(x, t, encoder_hidden_states=e, added_time_ids=a, return_dict=False)
    handle.remove()
    args, kwargs = captured["call"]
    call = lambda: target(*args, **kwargs)[0]
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "block": f"TransformerSpatioTemporalModel {tuple(args[0].shape)}"}
    outputs = {"eager": call().float()}
    for name in ("cudnn", "efficient"):
        if name == "efficient":
            use_efficient_temporal_attention(unet)
        torch._dynamo.reset()
        saved = SavedRegions([target], tempfile.mkdtemp())
        t0 = time.perf_counter()
        outputs[name] = call().float()
        torch.cuda.synchronize()
        row = {"compile_s": round(time.perf_counter() - t0, 1), "counts": dict(saved.counts),
               "ms": round(timed(call), 3),
               "max_abs_diff_vs_eager": float((outputs[name] - outputs["eager"]).abs().max())}
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        row["attention_kernels_ms_calls"] = [
            (ev.key[:100], round(ev.device_time_total / 1000, 3), ev.count)
            for ev in prof.key_averages()
            if ev.device_time_total > 0 and any(w in ev.key.lower() for w in ("fmha", "sdpa", "flash", "attention"))]
        results[name] = row
        print(name, row, flush=True)
        saved.remove()
    results["max_abs_diff_efficient_vs_cudnn"] = float((outputs["efficient"] - outputs["cudnn"]).abs().max())
    print("efficient vs cudnn", results["max_abs_diff_efficient_vs_cudnn"])
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


@torch.no_grad()
def step(out: str) -> None:
    """A whole guided UNet step compiled block by block (in-process), its temporal
    self-attention on cuDNN's kernel, then again on the memory-efficient one."""
    from bentosvd.weights.random_weights import build_synthetic
    from bentosvd.svd.accel.cross_attention import use_single_token_cross_attention
    from bentosvd.svd.compiled_blocks import UNET_REGIONS, compile_regions
    from bentosvd.svd.accel.temporal_attention import use_efficient_temporal_attention

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tuning_probe import step_inputs

    unet = build_synthetic(25, device="cuda")["unet"]
    use_single_token_cross_attention(unet)
    x, t, e, a = step_inputs(unet)
    call = lambda: unet(x, t, encoder_hidden_states=e, added_time_ids=a, return_dict=False)[0]
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    compile_regions(unet, UNET_REGIONS, None)
    outputs = {}
    for name in ("cudnn", "efficient"):
        if name == "efficient":
            use_efficient_temporal_attention(unet)
            torch._dynamo.reset()
        t0 = time.perf_counter()
        outputs[name] = call().float()
        torch.cuda.synchronize()
        results[name] = {"compile_s": round(time.perf_counter() - t0, 1), "ms": round(timed(call, 7, 2), 2)}
        print(name, results[name], flush=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    results["max_abs_diff"] = float((outputs["efficient"] - outputs["cudnn"]).abs().max())
    print("max_abs_diff", results["max_abs_diff"])
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    if sys.argv[2:3] == ["step"]:
        step(sys.argv[1])
    elif sys.argv[2:3] == ["block"]:
        block(sys.argv[1])
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "attention.json")
