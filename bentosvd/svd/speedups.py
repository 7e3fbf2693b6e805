"""`Speedups`: the one switch object for how the pipeline runs, and its two presets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Speedups:
    """How the pipeline runs; none of these changes what it computes beyond float rounding.

    single_token_cross_attention: SVD's cross-attention layers attend to one token (the
        image embedding), so each returns that token's projected value for every query
        (`bentosvd.svd.accel.cross_attention`); the query projection and the attention are skipped.
    efficient_temporal_attention: the temporal self-attention (25-token sequences) on the
        memory-efficient SDPA kernel, whose smaller tiles suit them better than cuDNN's
        (`bentosvd.svd.accel.temporal_attention`); the spatial layers keep cuDNN's.
    frame_conv: the UNet's and the VAE decoder's temporal convolutions (kernels over frames
        only) computed as one batched matrix product each over windows of frames read in
        place (`bentosvd.svd.accel.temporal_conv`), instead of cuDNN transposing each one's input
        and output to and from channels-last around its 3-D convolution.
    channels_last: convolutions in NHWC, the layout cuDNN's fp16 kernels want.
    channels_last_blocks: with compile_regions, the activations stay channels-last between
        the UNet's compiled blocks (each returns its output channels-last, and the eager
        layers between them hand that layout on), instead of each block transposing its
        NCHW input for its convolutions (`bentosvd.svd.accel.channels_last`). Blocks run eagerly (a shape
        not warmed up) stay NCHW.
    cudnn_attention: prefer cuDNN's fused attention (fastest on Hopper), then FlashAttention.
    compile_unet / compile_vae: torch.compile of the UNet / of the VAE's decoder; the first
        call per shape compiles (minutes cold, much less with a warm TORCHINDUCTOR_CACHE_DIR).
        The eager decoder spends most of its time in GroupNorm statistics computed with
        a few dozen GPU blocks per frame; compiled, a frame decodes 2.6x faster (H200).
    compile_regions: with compile_unet, compile the UNet's repeated blocks one by one
        (`UNET_REGIONS`) instead of the whole UNet as one graph: blocks of one class and
        shape share their compiled code, so compiling, and tracing again after a restart,
        take a fraction of the time.
    save_compiled: with compile_regions and a cache_dir, each block (and, with compile_vae,
        the decoder) is compiled ahead of time (torch.compile's aot_compile,
        `bentosvd.svd.compiled_blocks`) into a file in cache_dir that a restart loads in
        milliseconds instead of tracing it again (not with cuda_graphs or fp8: those
        compile in-process).
    cuda_graphs: the compiled UNet replays each step as a CUDA graph (Inductor's
        "reduce-overhead"), so the CPU no longer launches its kernels one by one; the
        graphs belong to the thread that recorded them.
    low_memory: keep each model on the GPU only while it runs and run the UNet's
        feed-forward layers one frame at a time: slower, for GPUs with 8 GiB.
    fp8: the UNet's attention and feed-forward matmuls in FP8 (torchao, dynamic scales;
        NVIDIA compute capability 8.9+). Changes the output more than rounding
        does: opt-in, its deviation is measured by the benchmark.
    step_cache: N >= 2 runs the whole UNet every N-th step and only its outermost level in
        between, on the deep features kept from the last whole step (`bentosvd.svd.stepcache`).
        Changes the output: opt-in, its deviation is measured by the benchmark. 0: off.
    step_cache_layers: with step_cache, the steps between run only this many of the last
        up block's layers (DeepCache's branch; 1-3 in SVD): faster, and the output changes
        more. 0: all of them (the whole outermost level).
    """

    single_token_cross_attention: bool = False
    efficient_temporal_attention: bool = False
    frame_conv: bool = False
    channels_last: bool = False
    channels_last_blocks: bool = False
    cudnn_attention: bool = False
    compile_unet: bool = False
    compile_regions: bool = False
    save_compiled: bool = False
    compile_vae: bool = False
    low_memory: bool = False
    fp8: bool = False
    cuda_graphs: bool = False
    step_cache: int = 0
    step_cache_layers: int = 0

    def __post_init__(self):
        problem = step_cache_problem(self.step_cache, self.step_cache_layers)
        if problem:
            raise ValueError(problem)
        if self.step_cache and self.cuda_graphs:
            raise ValueError("step_cache cannot be combined with cuda_graphs")

    @classmethod
    def fast(cls) -> Speedups:
        # Measured on an H100 (docs/BENCHMARKS.md): channels_last + cuDNN attention made
        # eager fp16 10% slower and gave a compiled UNet nothing (331 vs 332 TFLOP/s), so
        # the default fast path is the compiled UNet alone. CUDA graphs gave it nothing
        # (14.05 vs 14.06 s on an H200: launches are not its bottleneck). Compiled block by
        # block, its steps took 0.4% longer than as one graph (H200), and saved block by
        # block a restart loads them: both orientations warmed up in 14.5 s (H100) instead
        # of 44.5 s as one graph, traced again. The compiled decoder takes a frame in 33 ms
        # instead of 85 ms (H200, docs/bench/kernels_probe.py). The single-token
        # cross-attention took the 25 steps from 12.10 to 11.05 s (H100). The memory-efficient
        # kernel for the temporal self-attention took a step from 440.8 to 436.5 ms (H100).
        # The temporal convolutions as batched products: the steps 10.77 s instead of
        # 10.94 s, the decode 0.78 s instead of 0.89 s (H100). Channels-last between the
        # blocks: a step 420.9 ms instead of 428.0 ms (H100, compiled in-process), the
        # pipeline 11.11 s instead of 11.22 s (H200); with the convolution weights left
        # NCHW, a step 402.2 instead of 405.7 ms (H200), and the eager fallback unslowed.
        return cls(single_token_cross_attention=True, efficient_temporal_attention=True,
                   frame_conv=True, channels_last_blocks=True, compile_unet=True,
                   compile_regions=True, save_compiled=True, compile_vae=True)

    @classmethod
    def low_memory_mode(cls) -> Speedups:
        # LOW_MEMORY: for GPUs of 8 GiB (see low_memory); the cross-attention shortcut only
        # removes work and activations, so it comes along, as does the temporal attention's kernel.
        return cls(low_memory=True, single_token_cross_attention=True, efficient_temporal_attention=True)


def step_cache_problem(interval: int, layers: int) -> str | None:
    """What is wrong with step caching every `interval` steps on `layers` layers, or None;
    the settings (STEP_CACHE, STEP_CACHE_LAYERS) are checked by this too."""
    if interval == 1 or interval < 0:
        return (f"step_cache is {interval}: use 0 to turn step caching off, or 2 or more "
                "(1 would run the whole UNet at every step)")
    if layers and not interval:
        return ("step_cache_layers applies to step caching only: set step_cache (2 or more) "
                "too, or leave step_cache_layers at 0")
    return None
