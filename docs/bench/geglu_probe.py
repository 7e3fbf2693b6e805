"""Would SVD's feed-forward GEGLU run faster as one kernel? GPU only, Triton (which CUDA
builds of torch bring):

    python3 docs/bench/geglu_probe.py $OUT/geglu.json

Each of the UNet's 48 feed-forward layers a guided step starts with diffusers' `GEGLU`:
a linear layer to twice the inner width, then `hidden * gelu(gate)` over its two halves.
Compiled, that is a cuBLAS product that writes the whole [tokens, 2 x inner] result
(2.4 GB at the outermost level, 576x1024 with guidance) and a Triton kernel that reads it
back to write half as much. torch.compile does not fold the two (each output element
needs two of the product's columns; run w's max-autotune kept cuBLAS). The kernels here
compute both halves' tiles side by side (two accumulators over the same rows of the
input) and write only `hidden * gelu(gate)`: one program a tile (`launch`), or one a GPU
core looping over the tiles through TMA descriptors (`launch_persistent`). Each half is
rounded to the input's dtype before the exact (erf) gelu, as the product's output is.

For each level of the UNet (SHAPES): the compiled GEGLU, the product alone (the floor of
the unfused way) and each kernel configuration (CONFIGS; CUDA events, median of 10), each
compared with eager fp16 and with float32 arithmetic. Then the outermost transformer
block (spatial and temporal, with the fast path's attention changes) compiled with
diffusers' GEGLU and with the fused operator in the configuration best over a step.

Runs j and k (H100, 2026-11-28; docs/BENCHMARKS.md): within 3% of a step's compiled
GEGLU (88.1 against 90.7 ms), and the outermost block 29.49 -> 29.04 ms, because these
Triton products run at 280-420 TFLOP/s where cuBLAS's run at 520. Not taken into the
fast path.
"""

import json
import sys
import time

import torch
import torch.nn.functional as F
from cuda_timing import timed_ms
from diffusers.models.activations import GEGLU

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds come without Triton
    triton = None

# Tile sizes: a tile of BLOCK_M tokens x BLOCK_N outputs, with two accumulators (hidden and
# gate), over BLOCK_K input channels at a time; GROUP_M row tiles share their weight tiles
# in L2 before moving on. The operator's; the probe tries others (CONFIGS).
CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
PERSISTENT = True


if triton is not None:
    @triton.jit
    def _geglu_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                      HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # Tiles in groups of GROUP_M rows, column by column within a group.
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * tiles_n
        first_m = (pid // in_group) * GROUP_M
        group_m = min(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % group_m
        pid_n = (pid % in_group) // group_m

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :]
        # The weight is [2N, K]: rows [0, N) make the hidden half, [N, 2N) the gate.
        wh_ptrs = w_ptr + cols[None, :] * stride_wn + ks[:, None]
        wg_ptrs = wh_ptrs + N * stride_wn
        acc_h = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K, BLOCK_K):  # K is a multiple of BLOCK_K (checked by the caller)
            if EVEN:
                x = tl.load(x_ptrs)
                wh = tl.load(wh_ptrs)
                wg = tl.load(wg_ptrs)
            else:
                x = tl.load(x_ptrs, mask=rows[:, None] < M, other=0.0)
                wh = tl.load(wh_ptrs, mask=cols[None, :] < N, other=0.0)
                wg = tl.load(wg_ptrs, mask=cols[None, :] < N, other=0.0)
            acc_h = tl.dot(x, wh, acc_h)
            acc_g = tl.dot(x, wg, acc_g)
            x_ptrs += BLOCK_K
            wh_ptrs += BLOCK_K
            wg_ptrs += BLOCK_K

        if HAS_BIAS:
            if EVEN:
                acc_h += tl.load(b_ptr + cols)[None, :].to(tl.float32)
                acc_g += tl.load(b_ptr + N + cols)[None, :].to(tl.float32)
            else:
                acc_h += tl.load(b_ptr + cols, mask=cols < N, other=0.0)[None, :].to(tl.float32)
                acc_g += tl.load(b_ptr + N + cols, mask=cols < N, other=0.0)[None, :].to(tl.float32)
        dtype = out_ptr.dtype.element_ty
        hidden = acc_h.to(dtype).to(tl.float32)  # rounded as the product's output would be
        gate = acc_g.to(dtype).to(tl.float32)
        out = hidden * (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)))
        out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
        if EVEN:
            tl.store(out_ptrs, out.to(dtype))
        else:
            tl.store(out_ptrs, out.to(dtype), mask=(rows[:, None] < M) & (cols[None, :] < N))


if triton is not None:
    @triton.jit
    def _tile(tile, in_group, tiles_m, GROUP_M: tl.constexpr):
        first_m = (tile // in_group) * GROUP_M
        group_m = min(tiles_m - first_m, GROUP_M)
        return first_m + (tile % in_group) % group_m, (tile % in_group) // group_m

    @triton.jit
    def _geglu_persistent_kernel(x_desc, w_desc, b_ptr, out_desc, M, N, K, HAS_BIAS: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                 GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr):
        # One program per SM, each taking every NUM_SMS-th tile; the loads go through TMA
        # descriptors (zeros outside the tensor, stores clipped to it), and the tile loop and
        # the K loop are pipelined as one, so the next tile's loads overlap this one's
        # epilogue.
        start = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        in_group = GROUP_M * tiles_n
        tile_out = start - NUM_SMS
        dtype = out_desc.dtype
        for tile in tl.range(start, tiles_m * tiles_n, NUM_SMS, flatten=True):
            pid_m, pid_n = _tile(tile, in_group, tiles_m, GROUP_M)
            row, col = pid_m * BLOCK_M, pid_n * BLOCK_N
            acc_h = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for ki in range(k_tiles):
                x = x_desc.load([row, ki * BLOCK_K])
                acc_h = tl.dot(x, w_desc.load([col, ki * BLOCK_K]).T, acc_h)
                acc_g = tl.dot(x, w_desc.load([N + col, ki * BLOCK_K]).T, acc_g)
            tile_out += NUM_SMS
            pid_m, pid_n = _tile(tile_out, in_group, tiles_m, GROUP_M)
            row, col = pid_m * BLOCK_M, pid_n * BLOCK_N
            if HAS_BIAS:
                cols = col + tl.arange(0, BLOCK_N)
                acc_h += tl.load(b_ptr + cols, mask=cols < N, other=0.0)[None, :].to(tl.float32)
                acc_g += tl.load(b_ptr + N + cols, mask=cols < N, other=0.0)[None, :].to(tl.float32)
            hidden = acc_h.to(dtype).to(tl.float32)
            gate = acc_g.to(dtype).to(tl.float32)
            out = hidden * (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)))
            out_desc.store([row, col], out.to(dtype))


def launch_persistent(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      config: dict = CONFIG) -> torch.Tensor:
    from triton.tools.tensor_descriptor import TensorDescriptor

    config = dict(config)
    num_warps, num_stages = config.pop("num_warps"), config.pop("num_stages")
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    k = x.shape[-1]
    n = weight.shape[0] // 2
    x2 = x.reshape(-1, k).contiguous()
    weight = weight.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    _geglu_persistent_kernel[(min(sms, tiles),)](
        TensorDescriptor.from_tensor(x2, [bm, bk]), TensorDescriptor.from_tensor(weight, [bn, bk]),
        bias if bias is not None else weight, TensorDescriptor.from_tensor(out, [bm, bn]), m, n, k,
        HAS_BIAS=bias is not None, NUM_SMS=min(sms, tiles), num_warps=num_warps,
        num_stages=num_stages, **config)
    return out.reshape(*x.shape[:-1], n)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What diffusers' GEGLU computes."""
    hidden, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return hidden * F.gelu(gate)


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           config: dict = CONFIG) -> torch.Tensor:
    """Run the kernel on x [..., K] with weight [2N, K] (and bias [2N]); returns [..., N].
    Also runs in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1)."""
    config = dict(config)
    num_warps, num_stages = config.pop("num_warps"), config.pop("num_stages")
    k = x.shape[-1]
    n = weight.shape[0] // 2
    if k % config["BLOCK_K"] or weight.shape[0] % 2 or weight.shape[1] != k:
        raise ValueError(f"fused GEGLU needs a weight [2N, {k}] with {k} a multiple of "
                         f"{config['BLOCK_K']}; got {tuple(weight.shape)}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    weight = weight.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    even = m % config["BLOCK_M"] == 0 and n % config["BLOCK_N"] == 0
    grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    _geglu_kernel[grid](x2, weight, bias if bias is not None else weight, out, m, n, k,
                        x2.stride(0), weight.stride(0), out.stride(0),
                        HAS_BIAS=bias is not None, EVEN=even, num_warps=num_warps,
                        num_stages=num_stages, **config)
    return out.reshape(*x.shape[:-1], n)


@torch.library.custom_op("bentosvd_probe::geglu", mutates_args=())
def fused_geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """hidden * gelu(gate), with [hidden, gate] = x @ weight.T + bias."""
    if x.is_cuda:
        return (launch_persistent if PERSISTENT else launch)(x, weight, bias)
    return reference(x, weight, bias)


@fused_geglu.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))


class FusedGEGLU(torch.nn.Module):
    """diffusers' GEGLU through `torch.ops.bentosvd_probe.geglu` (opaque to torch.compile),
    on the same linear layer."""

    def __init__(self, proj: torch.nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return fused_geglu(hidden_states, self.proj.weight, self.proj.bias)


def use_fused_geglu(model: torch.nn.Module) -> int:
    """Swap the model's GEGLU layers for FusedGEGLU (same linear layers); returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is GEGLU:
                parent._modules[name] = FusedGEGLU(child.proj)
                count += 1
    return count


# (level, tokens = 2 x 25 frames x positions, input channels, inner width, calls a step)
SHAPES = [
    ("72x128", 50 * 9216, 320, 1280, 15),
    ("36x64", 50 * 2304, 640, 2560, 15),
    ("18x32", 50 * 576, 1280, 5120, 15),
    ("9x16", 50 * 144, 1280, 5120, 3),
]
def config(bm, bn, bk, warps, stages):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)


# (kernel, tiles): one program a tile (plain), or one a GPU core looping over tiles through
# TMA descriptors (persistent).
CONFIGS = {
    "plain 128x128x64 w8 s3": (launch, config(128, 128, 64, 8, 3)),
    "plain 256x64x64 w8 s3": (launch, config(256, 64, 64, 8, 3)),
    "plain 128x128x32 w8 s5": (launch, config(128, 128, 32, 8, 5)),
    "persistent 128x128x64 w8 s2": (launch_persistent, config(128, 128, 64, 8, 2)),
    "persistent 128x128x64 w8 s3": (launch_persistent, config(128, 128, 64, 8, 3)),
    "persistent 128x128x64 w8 s4": (launch_persistent, config(128, 128, 64, 8, 4)),
    "persistent 128x128x32 w8 s5": (launch_persistent, config(128, 128, 32, 8, 5)),
    "persistent 256x64x64 w8 s3": (launch_persistent, config(256, 64, 64, 8, 3)),
    "persistent 128x64x64 w4 s4": (launch_persistent, config(128, 64, 64, 4, 4)),
    "persistent 64x128x64 w4 s4": (launch_persistent, config(64, 128, 64, 4, 4)),
}


def diff(a, b) -> float:
    return round(float((a.float() - b.float()).abs().max()), 5)


def timed(fn) -> float:
    return round(timed_ms(fn, repeats=10, warmup=3), 4)


@torch.no_grad()
def kernels(results: dict) -> None:
    gen = torch.Generator("cuda").manual_seed(0)
    results["shapes"] = []
    for level, m, k, n, calls in SHAPES:
        layer = GEGLU(k, n).to("cuda", torch.half)
        x = torch.randn(m, k, device="cuda", dtype=torch.half, generator=gen)
        eager = layer(x)
        exact = reference(x.float(), layer.proj.weight.float(), layer.proj.bias.float())
        compiled = torch.compile(layer, dynamic=False)
        compiled(x)
        flops = 2 * m * k * 2 * n
        row = {"level": level, "m": m, "k": k, "n": n, "calls": calls,
               "eager_vs_float32": diff(eager, exact),
               "compiled_ms": timed(lambda: compiled(x)),
               "product_only_ms": timed(lambda: layer.proj(x)),
               "fused": {}}
        row["compiled_vs_eager"] = diff(compiled(x), eager)
        for name, (kernel, tiles) in CONFIGS.items():
            try:
                t0 = time.perf_counter()
                out = kernel(x, layer.proj.weight, layer.proj.bias, tiles)
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                ms = timed(lambda: kernel(x, layer.proj.weight, layer.proj.bias, tiles))
                row["fused"][name] = {"ms": ms, "tflops": round(flops / ms / 1e9, 1),
                                      "first_call_s": round(first, 2),
                                      "vs_eager": diff(out, eager), "vs_float32": diff(out, exact)}
            except Exception as e:
                row["fused"][name] = f"failed: {type(e).__name__}: {str(e)[:300]}"
            print(level, name, row["fused"][name], flush=True)
        ok = {c: r["ms"] for c, r in row["fused"].items() if isinstance(r, dict)}
        row["best"] = min(ok, key=ok.get) if ok else None
        print(level, {key: row[key] for key in row if key != "fused"}, flush=True)
        results["shapes"].append(row)
        del layer, x, eager, exact, compiled
        torch.cuda.empty_cache()
    for which in ["compiled_ms", "product_only_ms"]:
        results[f"step_{which}"] = round(sum(r[which] * r["calls"] for r in results["shapes"]), 2)
    for name in CONFIGS:
        rows = [r for r in results["shapes"] if isinstance(r["fused"].get(name), dict)]
        if len(rows) == len(SHAPES):
            results[f"step_fused_ms {name}"] = round(sum(r["fused"][name]["ms"] * r["calls"] for r in rows), 2)
    results["step_fused_best_ms"] = round(sum(
        r["fused"][r["best"]]["ms"] * r["calls"] for r in results["shapes"] if r["best"]), 2)
    # The block below runs the operator with the configuration best over a whole step.
    whole = {name: v for name, v in results.items() if name.startswith("step_fused_ms ")}
    if whole:
        best = min(whole, key=whole.get).removeprefix("step_fused_ms ")
        global CONFIG, PERSISTENT
        kernel, CONFIG = CONFIGS[best]
        PERSISTENT = kernel is launch_persistent
        results["block_config"] = best


@torch.no_grad()
def block(results: dict) -> None:
    """The outermost transformer block, compiled as the fast path compiles it."""
    from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel

    from bentosvd.svd.accel.cross_attention import use_single_token_cross_attention
    from bentosvd.svd.accel.temporal_attention import use_efficient_temporal_attention

    torch.manual_seed(0)
    model = TransformerSpatioTemporalModel(5, 64, in_channels=320, num_layers=1,
                                           cross_attention_dim=1024).to("cuda", torch.half).eval()
    use_single_token_cross_attention(model)
    use_efficient_temporal_attention(model)
    gen = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(50, 320, 72, 128, device="cuda", dtype=torch.half, generator=gen)
    context = torch.randn(50, 1, 1024, device="cuda", dtype=torch.half, generator=gen)
    indicator = torch.zeros(2, 25, device="cuda", dtype=torch.half)

    def run():
        return model(x, encoder_hidden_states=context, image_only_indicator=indicator,
                     return_dict=False)[0]

    eager = run()
    out = {}
    for name, swap in [("diffusers_geglu", lambda: None), ("fused_geglu", lambda: use_fused_geglu(model))]:
        swap()
        torch._dynamo.reset()
        model.compile(dynamic=False)
        t0 = time.perf_counter()
        result = run()
        torch.cuda.synchronize()
        out[name] = {"compile_s": round(time.perf_counter() - t0, 1), "ms": timed(run),
                     "vs_eager": diff(result, eager)}
        print("block", name, out[name], flush=True)
    results["outermost_block"] = out


def main(path: str) -> None:
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import triton
        results["triton"] = triton.__version__
    except ImportError:
        results["triton"] = None
    for part in (kernels, block):
        try:
            part(results)
        except Exception as e:
            results[part.__name__] = f"failed: {type(e).__name__}: {str(e)[:500]}"
            print(part.__name__, results[part.__name__], flush=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps({k: v for k, v in results.items() if k != "shapes"}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
