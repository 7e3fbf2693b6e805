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
    channels_last_blocks: with compile_regions, the activations stay channels-last between
        the UNet's compiled blocks (each returns its output channels-last, and the eager
        layers between them hand that layout on), instead of each block transposing its
        NCHW input for its convolutions (`bentosvd.svd.accel.channels_last`). Blocks run eagerly (a shape
        not warmed up) stay NCHW.
    compile_unet / compile_vae: torch.compile of the UNet / of the VAE's decoder; the first
        call per shape compiles (minutes cold, much less with a warm TORCHINDUCTOR_CACHE_DIR).
        The eager decoder spends most of its time in GroupNorm statistics computed with
        a few dozen GPU blocks per frame, which the compiled one fuses.
    compile_regions: with compile_unet, compile the UNet's repeated blocks one by one
        (`UNET_REGIONS`) instead of the whole UNet as one graph: blocks of one class and
        shape share their compiled code, so compiling, and tracing again after a restart,
        take a fraction of the time.
    save_compiled: with compile_regions and a cache_dir, each block (and, with compile_vae,
        the decoder) is compiled ahead of time (torch.compile's aot_compile,
        `bentosvd.svd.compiled_blocks`) into a file in cache_dir that a restart loads in
        milliseconds instead of tracing it again (not with fp8, which compiles in-process).
    low_memory: keep each model on the GPU only while it runs, run the UNet's feed-forward
        layers one frame at a time and the guidance batch one half at a time: slower, for
        GPUs with 8 GiB.
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
    channels_last_blocks: bool = False
    compile_unet: bool = False
    compile_regions: bool = False
    save_compiled: bool = False
    compile_vae: bool = False
    low_memory: bool = False
    fp8: bool = False
    step_cache: int = 0
    step_cache_layers: int = 0

    def __post_init__(self):
        problem = step_cache_problem(self.step_cache, self.step_cache_layers)
        if problem:
            raise ValueError(problem)

    @classmethod
    def fast(cls) -> Speedups:
        """The default on a GPU: every speed-up that keeps the output exact (within float
        rounding). What each gives is in docs/performance.md."""
        return cls(single_token_cross_attention=True, efficient_temporal_attention=True,
                   frame_conv=True, channels_last_blocks=True, compile_unet=True,
                   compile_regions=True, save_compiled=True, compile_vae=True)

    @classmethod
    def low_memory_mode(cls) -> Speedups:
        """LOW_MEMORY: for GPUs of 8 GiB. The two attention shortcuts only remove work and
        activations, so they come along."""
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
