"""Loading SVD's parts and turning one image into video frames.

The work is diffusers' `StableVideoDiffusionPipeline`, called with the parameters mapped
exactly as Stability's reference scripts meant them; `VideoGenerator` adds what a server
needs around it: loading from the model store's folders, one seeded generator per request,
and frames handed back as uint8 straight from the device.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import StableVideoDiffusionPipeline
from diffusers.models.unets.unet_spatio_temporal_condition import (
    UNetSpatioTemporalConditionOutput,
)
from PIL import Image

from bentosvd.protocol import GenerationSettings
from bentosvd.svd.accel.cross_attention import use_single_token_cross_attention
from bentosvd.svd.accel.fp8 import quantize_fp8
from bentosvd.svd.accel.temporal_attention import use_efficient_temporal_attention
from bentosvd.svd.accel.temporal_conv import use_frame_conv
from bentosvd.svd.compiled_blocks import (
    UNET_REGIONS,
    SavedRegions,
    compile_regions,
    region_forward,
)
from bentosvd.svd.loading import load_parts, resolve_device, resolve_dtype
from bentosvd.svd.speedups import Speedups
from bentosvd.svd.stepcache import StepCache


class VideoGenerator:
    """One loaded SVD pipeline; `generate` runs one request at a time."""

    def __init__(self, parts: dict, device: torch.device, speedups: Speedups = Speedups(),
                 cache_dir: Path | None = None, guidance_pair=None):
        self.device = device
        self.speedups = speedups
        self.pipe = StableVideoDiffusionPipeline(**parts)
        self.pipe.set_progress_bar_config(disable=True)
        unet, vae = self.pipe.unet, self.pipe.vae
        use_unet_speedups(unet, speedups, device)
        if speedups.frame_conv:
            use_frame_conv(vae)
        # dynamic=False in every compile below: each image orientation gets kernels of its
        # own fixed shape; letting the second shape turn the graph dynamic gives slower
        # kernels to both.
        # The decoder is kept on disk beside the UNet's blocks when they are.
        self.saved_regions = compile_blocks(unet, speedups, cache_dir,
                                            may_build=lambda: self.compile_new_shapes,
                                            decoder=vae.decoder if speedups.compile_vae else None)
        whole = speedups.compile_unet and not speedups.compile_regions
        self.step_cache = None
        if speedups.step_cache:
            # Compiles its two passes itself (the choice between them stays outside).
            self.step_cache = StepCache(unet, speedups.step_cache, compile=whole,
                                        layers=speedups.step_cache_layers)
        elif whole:
            unet.compile(dynamic=False)
        if speedups.compile_vae and self.saved_regions is None:
            vae.decoder.compile(dynamic=False)
        if speedups.low_memory and device.type == "cuda":
            # Before the offload hooks, which then wrap this forward and still move the
            # weights: the hooks replace `forward` and call whatever it was.
            split_guidance_batch(unet)
            self.pipe.enable_model_cpu_offload(device=device)
            # dim 0 is the frames (and, in temporal blocks, diffusers chunks the frames
            # itself): one frame's feed-forward at a time, a few dozen calls per layer.
            unet.enable_forward_chunking(chunk_size=1, dim=0)
        if guidance_pair is not None:
            # CFG_PARALLEL=2 (bentosvd.svd.cfg_parallel): the unconditional half of each
            # step on the pair's second device; it compiles while this warm-up does.
            guidance_pair.take_over(unet, may_build=lambda: self.compile_new_shapes)
        self.phases = PhaseTimer(self.pipe, device)
        # What has run while compiling was allowed: ("unet", frames, height, width) and
        # ("vae", frames decoded in one call, height, width).
        self.compiled_shapes: set[tuple[str, int, int, int]] = set()
        # Set to False once warmed up: from then on a shape not in compiled_shapes runs
        # eagerly instead of compiling for minutes inside a request.
        self.compile_new_shapes = True

    @classmethod
    def load(cls, pipeline_dir: Path, image_encoder_dir: Path, device: str = "auto",
             dtype: str = "auto", speedups: Speedups = Speedups(),
             cache_dir: Path | None = None, guidance_pair=None) -> VideoGenerator:
        """`guidance_pair` (bentosvd.svd.cfg_parallel.GuidancePair): run the unconditional
        half of each guided step on its device."""
        dev = resolve_device(device)
        # Offloading keeps the weights on the CPU between uses.
        load_on = torch.device("cpu") if speedups.low_memory else dev
        parts = load_parts(pipeline_dir, image_encoder_dir, load_on, resolve_dtype(dtype, dev))
        return cls(parts, dev, speedups, cache_dir, guidance_pair)

    def generate(self, image: np.ndarray, settings: GenerationSettings,
                 on_step: Callable[[int, int], None] | None = None,
                 timings: dict | None = None, decode: bool = True,
                 on_frames: Callable[[np.ndarray], None] | None = None,
                 interpolation=None) -> np.ndarray | None:
        """(H, W, 3) uint8 image at the model's size → (frames, H, W, 3) uint8 video.

        `on_step(step, total)` runs after every denoising step, once the step's GPU work is
        done; an exception raised there stops the generation (that is how a cancelled
        request gives the GPU back). `on_frames(chunk)` gets each decoded chunk of
        `decode_chunk_size` frames as (n, H, W, 3) uint8 as soon as it is on the host, in
        order, while the next chunk decodes (the server encodes the video meanwhile).
        `timings`, if given, gets the seconds of each phase: image_encode, denoise,
        vae_decode. `decode=False` stops after the denoising loop and returns None
        (warming up). `interpolation` (bentosvd.rife.stream.StreamingInterpolation) raises
        the frame rate on the device as the chunks are decoded: what is handed on and
        returned are then its frames.
        """
        height, width = image.shape[:2]
        generator = torch.Generator(self.device).manual_seed(settings.seed)
        self.phases.reset()
        start = time.perf_counter()

        def step_end(pipe, i, t, kwargs):
            if on_step is not None:
                sync(self.device)  # the step really ran: progress and deadlines are true
                on_step(i + 1, settings.num_inference_steps)
            return kwargs

        frames = settings.num_frames
        unet_shape = ("unet", frames, height, width)
        # diffusers' pipeline calls scheduler.step() without the generator: a sampler that
        # draws noise in its steps (the turbo's) takes the request's from here.
        self.pipe.scheduler.generator = generator
        with self._compiled_for({unet_shape}), self._fresh_step_cache():
            latents = self.pipe(
                Image.fromarray(image), height=height, width=width, num_frames=frames,
                num_inference_steps=settings.num_inference_steps,
                min_guidance_scale=settings.min_guidance_scale,
                max_guidance_scale=settings.max_guidance_scale, fps=settings.fps,
                motion_bucket_id=settings.motion_bucket_id,
                noise_aug_strength=settings.noise_aug_strength, generator=generator,
                output_type="latent", callback_on_step_end=step_end,
            ).frames
        # Decoded here rather than inside the pipeline call, so that the decoder runs
        # compiled only where its own shapes were warmed (decoding_t is per request).
        video = self.decode(latents, settings.decode_chunk_size, on_frames,
                            interpolation) if decode else None
        if timings is not None:
            timings.update(self.phases.times)
            timings["denoise"] = time.perf_counter() - start - sum(self.phases.times.values())
        return video

    def decode(self, latents: torch.Tensor, chunk: int,
               on_frames: Callable[[np.ndarray], None] | None = None,
               interpolation=None) -> np.ndarray:
        """(1, F, C, h, w) latents → (F, H, W, 3) uint8 frames, `chunk` frames per decoder
        call (diffusers' decode_chunk_size), each call's frames (interpolated, with
        `interpolation`) handed to `on_frames` as in `generate`.

        On a GPU, nothing waits between the calls: each chunk's frames are copied to the
        host asynchronously, and chunk i is waited for (and handed on) only once the call
        for chunk i + 1 is queued, so the GPU decodes while the host takes the frames."""
        frames = latents.shape[1]
        height, width = (side * self.pipe.vae_scale_factor for side in latents.shape[-2:])
        lag = 1 if self.device.type == "cuda" else 0  # on the CPU every call has finished
        chunks, copying = [], []

        def hand_on(copy: HostCopy) -> None:
            chunks.append(copy.wait())
            if on_frames is not None:
                on_frames(chunks[-1])

        shapes = {("vae", n, height, width) for n in decode_calls(frames, chunk)}
        with self.phases.timed("vae_decode"), self._compiled_for(shapes):
            for first in range(0, frames, chunk):
                n = min(chunk, frames - first)
                # The calls diffusers' decode_latents would make, one at a time.
                decoded = self.pipe.decode_latents(latents[:, first:first + n], n, n)
                video = to_uint8(self.pipe.video_processor.postprocess_video(decoded, output_type="pt")[0])
                if interpolation is not None:
                    video = interpolation.feed(video)
                if len(video):
                    copying.append(HostCopy(video))
                if len(copying) > lag:
                    hand_on(copying.pop(0))
            for copy in copying:
                hand_on(copy)
        if self.speedups.low_memory:
            self.pipe.maybe_free_model_hooks()  # the VAE back to the CPU, as the pipeline does
        return np.concatenate(chunks)

    def warm_up(self, num_frames: int, height: int, width: int, min_guidance_scale: float = 1.0,
                max_guidance_scale: float = 2.0) -> None:
        """Compile (or load from the compile cache) the kernels for this shape: one
        denoising step at the variant's guidance, as a request runs it (guidance above 1
        doubles the UNet's batch; two steps with the step cache: a whole and a shallow
        one). When the VAE's decoder is compiled too, it decodes one frame, as every call
        of a request at decoding_t 1 (the default) does; decoding all the frames would
        only repeat that call."""
        settings = GenerationSettings(
            num_frames=num_frames, num_inference_steps=2 if self.step_cache else 1,
            min_guidance_scale=min_guidance_scale, max_guidance_scale=max_guidance_scale,
            fps=7, motion_bucket_id=127, noise_aug_strength=0.02, decode_chunk_size=1, seed=0)
        self.generate(np.zeros((height, width, 3), np.uint8), settings, decode=False)
        if self.speedups.compile_vae:
            vae = self.pipe.vae
            factor = self.pipe.vae_scale_factor
            latent = torch.zeros(1, 1, vae.config.latent_channels, height // factor,
                                 width // factor, device=self.device, dtype=vae.dtype)
            with self._compiled_for({("vae", 1, height, width)}):
                self.pipe.decode_latents(latent, 1, 1)

    def _compiled_for(self, shapes: set[tuple]) -> contextlib.AbstractContextManager:
        """Compiled code runs (and, while compiling new shapes, compiles) for these shapes
        only if all were warmed; otherwise the models run eagerly. Compiled blocks kept on
        disk choose per call themselves (`SavedRegions`), and torch's stance is global:
        left alone then, or it would stop a compile running in the background."""
        if self.saved_regions is not None:
            return contextlib.nullcontext()
        if self.compile_new_shapes:
            self.compiled_shapes |= shapes
        elif not shapes <= self.compiled_shapes:
            return torch.compiler.set_stance("force_eager")
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _fresh_step_cache(self):
        """What a generation kept (the step cache's deep feature, large at full size) is
        dropped when it ends, stopped or not, so the next one starts with nothing kept."""
        try:
            yield
        finally:
            if self.step_cache is not None:
                self.step_cache.reset()


class PhaseTimer:
    """Times the phases of a generation, the device synchronised around each: the
    pipeline's image-encode methods (wrapped here) and whatever runs inside `timed(phase)`
    (`VideoGenerator.decode`). The rest of a generation is the denoising loop."""

    PHASES = {"_encode_image": "image_encode", "_encode_vae_image": "image_encode"}

    def __init__(self, pipe, device: torch.device):
        self.device = device
        self.reset()
        for method, phase in self.PHASES.items():
            setattr(pipe, method, self._timed(getattr(pipe, method), phase))

    def reset(self) -> None:
        self.times = {"image_encode": 0.0, "vae_decode": 0.0}

    @contextlib.contextmanager
    def timed(self, phase: str):
        sync(self.device)
        start = time.perf_counter()
        yield
        sync(self.device)
        self.times[phase] += time.perf_counter() - start

    def _timed(self, fn, phase):
        def wrapper(*args, **kwargs):
            with self.timed(phase):
                return fn(*args, **kwargs)
        return wrapper


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so times are true."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compile_blocks(unet: torch.nn.Module, speedups: Speedups, cache_dir: Path | None,
                   may_build: Callable[[], bool],
                   decoder: torch.nn.Module | None = None) -> SavedRegions | None:
    """The UNet's blocks compiled one by one, as `speedups` asks (the leader's UNet and,
    with CFG_PARALLEL=2, the peer's alike): kept on disk in `cache_dir` with `decoder`
    (built only while `may_build()`), returned as their SavedRegions; or compiled in-process
    (None, and `decoder` is the caller's). Compiling the whole UNet is the caller's."""
    if not (speedups.compile_unet and speedups.compile_regions):
        return None
    # Not with torchao's FP8 tensors (never tried through aot_compile): those compile
    # in-process.
    if speedups.save_compiled and not speedups.fp8 and cache_dir is not None:
        blocks = [m for m in unet.modules() if type(m).__name__ in UNET_REGIONS]
        if decoder is not None:
            blocks.append(decoder)
        # The UNet's blocks hand on channels-last, the decoder not.
        return SavedRegions(blocks, cache_dir, may_build=may_build,
                            forward_of=lambda block: region_forward(
                                block, speedups.channels_last_blocks and block is not decoder))
    compile_regions(unet, UNET_REGIONS, channels_last=speedups.channels_last_blocks)
    return None


def use_unet_speedups(unet: torch.nn.Module, speedups: Speedups, device: torch.device) -> None:
    """The kernel-level speed-ups `speedups` asks for, applied to the UNet (the leader's
    and, with CFG_PARALLEL=2, the peer's alike); compiling is the caller's."""
    if speedups.single_token_cross_attention:
        use_single_token_cross_attention(unet)
    if speedups.efficient_temporal_attention:
        use_efficient_temporal_attention(unet)
    if speedups.frame_conv:
        use_frame_conv(unet)
    if speedups.fp8:
        quantize_fp8(unet, device)


def split_guidance_batch(unet: torch.nn.Module) -> None:
    """Run the UNet on one sample of its batch at a time (classifier-free guidance's
    unconditional and conditional halves one after the other): half the activations in
    memory at once, for the same result up to float rounding."""
    forward = unet.forward

    def one_at_a_time(sample, timestep, encoder_hidden_states, added_time_ids,
                      return_dict=True):
        n = sample.shape[0]
        if n == 1:
            return forward(sample, timestep, encoder_hidden_states, added_time_ids,
                           return_dict=return_dict)
        per_sample = torch.is_tensor(timestep) and timestep.ndim > 0 and timestep.shape[0] == n
        out = torch.cat([
            forward(sample[i:i + 1], timestep[i:i + 1] if per_sample else timestep,
                    encoder_hidden_states[i:i + 1], added_time_ids[i:i + 1],
                    return_dict=False)[0]
            for i in range(n)])
        return UNetSpatioTemporalConditionOutput(sample=out) if return_dict else (out,)

    unet.forward = one_at_a_time


def decode_calls(num_frames: int, chunk: int) -> set[int]:
    """How many frames each of the VAE's calls decodes, decoding `chunk` at a time."""
    return {min(chunk, num_frames - start) for start in range(0, num_frames, chunk)}


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Decoded frames, (F, C, H, W) floats in [0, 1], as (F, H, W, C) uint8 on their device,
    rounded as diffusers rounds (`numpy_to_pil`)."""
    return (frames * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


class HostCopy:
    """(F, H, W, C) uint8 frames on their way to the host, converted on the device so only
    the final bytes cross. The copy is queued when made, and `wait()` returns the frames
    once they are on the host. On a GPU the copy goes to pinned memory without blocking,
    so the host can queue more work before it waits; on the CPU it has finished when
    made."""

    def __init__(self, frames: torch.Tensor):
        self.event = None
        if frames.is_cuda:
            self.frames = frames.contiguous().to("cpu", non_blocking=True)  # pinned
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.frames = frames.contiguous()

    def wait(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.frames.numpy()
