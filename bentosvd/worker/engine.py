"""The GPU engine, without BentoML: load the pipeline, warm it up, run one generation at
a time with its stop checks and fault handling.

`bentosvd/worker/service.py` wraps an `Engine` in a BentoML service and imports this module
only inside the worker process: `bentoml serve` and the API service import that module too,
and torch plus diffusers would add seconds to every start of theirs.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import threading
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from bentosvd.media.streaming_encode import StreamingEncode, encode_output
from bentosvd.protocol import (
    Failed,
    FailureKind,
    GenerationSettings,
    OutputSpec,
    Started,
    Step,
)
from bentosvd.rife.interpolate import times_for_fps
from bentosvd.rife.stream import StreamingInterpolation
from bentosvd.svd import compiled_blocks
from bentosvd.svd.cfg_parallel import GuidancePair, load_unet, pair_devices
from bentosvd.svd.generator import VideoGenerator
from bentosvd.svd.loading import resolve_device, resolve_dtype
from bentosvd.svd.speedups import Speedups
from bentosvd.weights import rife_models

logger = logging.getLogger("bentoml.svd")


# Rounds of building a shape's compiled blocks in the background: each can reveal blocks
# whose inputs change layout once the blocks before them run compiled (two or three do).
MAX_ROUNDS = 8
# The longest the background compile defers to waiting requests before it takes its turn
# (after the request running now): a worker never idle would otherwise never compile.
COMPILE_DEFERS_AT_MOST = 60.0


class GpuTurns:
    """The engine's one-at-a-time lock, requests first: `with turns.request():` for a
    generation, `with turns.background():` for a piece of the background compile, which
    waits while a request waits (up to COMPILE_DEFERS_AT_MOST).

    The compile must not run beside a request at all: Dynamo and Inductor are Python, so a
    request beside them ran several times slower (the interpreter lock), and torch.fx's tracer
    patches `torch.nn.Module.__call__` for the whole process while it traces, so a request
    calling its modules meanwhile failed (seen on the GPU: `NameError: module is not
    installed as a submodule`)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._state = threading.Condition()
        self._waiting = 0

    @contextlib.contextmanager
    def request(self):
        with self._state:
            self._waiting += 1
        try:
            self._lock.acquire()
        finally:
            with self._state:
                self._waiting -= 1
                self._state.notify_all()
        try:
            yield
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def background(self):
        deadline = time.monotonic() + COMPILE_DEFERS_AT_MOST
        while True:
            with self._state:
                self._state.wait_for(lambda: self._waiting == 0,
                                     timeout=max(0.0, deadline - time.monotonic()))
            self._lock.acquire()
            with self._state:  # a request that came while this waited for the lock goes first
                if self._waiting == 0 or time.monotonic() >= deadline:
                    break
            self._lock.release()
        try:
            yield
        finally:
            self._lock.release()


class Stopped(Exception):
    """Raised between denoising steps to stop a generation nobody is waiting for."""

    def __init__(self, kind: FailureKind, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Frames:
    """A finished generation: (F, H, W, 3) uint8 frames, seconds per phase, torch's peak."""

    frames: np.ndarray
    timings: dict[str, float]
    gpu_peak_bytes: int | None


def speedups_for(settings, device: str) -> Speedups:
    """The speed-ups the settings ask for on `device`: LOW_MEMORY's, the fast path's (by
    default on a CUDA device) or none, with the step cache as set. Choosing the fast path
    also points torch's compile cache at COMPILE_CACHE_DIR, so call it before torch
    compiles anything."""
    on_gpu = device.startswith("cuda")
    if settings.low_memory:
        speedups = Speedups.low_memory_mode()
    elif settings.fast_path if settings.fast_path is not None else on_gpu:
        # Where compiled kernels are kept across restarts, set before torch first reads it.
        # The setting wins over a TORCHINDUCTOR_CACHE_DIR inherited from elsewhere (torch
        # sets one in its own process environment when it first needs it).
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.expanduser(settings.compile_cache_dir)
        speedups = replace(Speedups.fast(), fp8=settings.fp8,
                           compile_regions=settings.compile_regions,
                           compile_vae=settings.compile_vae)
    else:
        speedups = Speedups(fp8=settings.fp8)
    return replace(speedups, step_cache=settings.step_cache,
                   step_cache_layers=settings.step_cache_layers)


class Engine:
    """One SVD pipeline on one device. `run` is called from worker threads; a lock keeps
    it to one generation at a time (the pipeline is not thread-safe, and one GPU runs one
    generation well)."""

    def __init__(self, settings, variant, name: str, pipeline_dir: Path,
                 image_encoder_dir: Path, index: int = 0, busy_gauge=None,
                 rife: tuple[str, str] | None = None):
        self.settings, self.variant = settings, variant
        pair = None
        if settings.cfg_parallel == 2:
            device, peer_device = (str(d) for d in pair_devices(settings.device, index))
        else:
            device = str(resolve_device(settings.device, index))
        speedups = speedups_for(settings, device)
        self.on_gpu = device.startswith("cuda")
        if self.on_gpu:
            # Sets up the device's memory allocator now: with LOW_MEMORY the weights load on
            # the CPU, so nothing has touched the GPU before the first request, and
            # reset_peak_memory_stats on an allocator not yet set up raises "Invalid device
            # argument".
            torch.cuda.init()
            torch.zeros(1, device=device)
        started = time.perf_counter()
        cache_dir = compiled_blocks.folder(settings.compile_cache_dir)
        shown = device
        if settings.cfg_parallel == 2:
            # Started first: the second GPU's process loads its UNet while this one loads.
            unet = functools.partial(load_unet, pipeline_dir / "unet",
                                     resolve_dtype(settings.dtype, torch.device(device)))
            pair = GuidancePair(device, peer_device, unet, speedups, cache_dir,
                                timeout=settings.cfg_parallel_timeout)
            shown = f"{device}+{peer_device}"
        self.generator = VideoGenerator.load(pipeline_dir, image_encoder_dir, device=device,
                                             dtype=settings.dtype, speedups=speedups,
                                             cache_dir=cache_dir, guidance_pair=pair)
        logger.info("loaded %s (%s) on %s in %.1f s with %s", name, variant.description, shown,
                    time.perf_counter() - started, speedups)
        # RIFE (tag, folder), for interpolation on this device as the frames are decoded.
        self.rife = None
        if rife is not None:
            self.rife = rife_models.load(rife[1], self.generator.device, self.generator.pipe.unet.dtype)
        # What GET health tells the API for its one line at ready.
        on = [f.name for f in fields(speedups) if getattr(speedups, f.name) not in (False, 0, None)]
        self.description = {"model": name, "device": shown, "speedups": ", ".join(on) or "none",
                            "rife": f"{rife[0]} (RIFE {self.rife.version})" if rife else None}
        # Each WARMUP shape: "compiled", "compiling" (served eagerly meanwhile) or "eager".
        self.shapes: dict[str, str] = {}
        # One generation at a time: requests, and the background compile's pieces.
        self.turns = GpuTurns()
        # With CFG_PARALLEL=2 both GPUs compile during the warm-up: nothing in the
        # background, where the second GPU's process could not follow.
        if speedups.compile_unet and self.generator.saved_regions is not None \
                and settings.compile_in_background and pair is None:
            self._serve_while_compiling()
        elif speedups.compile_unet:
            # Compile now so /readyz turns 200 only once a request will not stall for minutes;
            # other shapes (num_frames, orientation, decoding_t for the decoder) then run
            # eagerly instead of compiling.
            for orientation in settings.warmup:
                w, h = self._size(orientation)
                started = time.perf_counter()
                self.generator.warm_up(variant.num_frames, h, w, variant.min_guidance_scale,
                                       variant.max_guidance_scale)
                logger.info("warmed up %s (%dx%d) in %.1f s%s", orientation, w, h,
                            time.perf_counter() - started, self._saved_blocks())
                self.shapes[orientation] = "compiled"
            self.generator.compile_new_shapes = False
        else:
            # Uncompiled too, the first call of each kernel costs (the CPU's oneDNN builds its
            # primitives, cuDNN searches its algorithms), and so does the encoder's first
            # video: one step at each WARMUP shape, decoded and encoded, so that the first
            # request after /readyz runs as fast as the next.
            for orientation in settings.warmup:
                w, h = self._size(orientation)
                started = time.perf_counter()
                self._run_once(h, w)
                logger.info("warmed up %s (%dx%d) in %.1f s", orientation, w, h,
                            time.perf_counter() - started)
                self.shapes[orientation] = "eager"
        self.busy_gauge = busy_gauge
        self.faults_in_a_row = 0
        self.injected_faults = list(settings.inject_faults)

    def _serve_while_compiling(self) -> None:
        """One eager generation per WARMUP shape, which records the compiled blocks that
        shape needs. If the compile cache has them, they are loaded now; otherwise the
        worker turns ready and serves eagerly while a thread builds them, shape by shape,
        each put to use between two requests."""
        regions = self.generator.saved_regions
        self.generator.compile_new_shapes = False  # blocks without compiled code run eagerly
        pending = []
        for orientation in self.settings.warmup:
            w, h = self._size(orientation)
            started = time.perf_counter()
            with regions.missed() as keys:
                # Two steps with the step cache: its shallow pass runs on the second.
                self._run_once(h, w, steps=2 if self.generator.step_cache else 1)
            for _ in range(MAX_ROUNDS):  # what the cache has, loaded round by round
                if not keys or not regions.saved(keys):
                    break
                regions.build(keys)
                regions.adopt()
                keys = self._missed_blocks(orientation)
            if not keys:
                self.shapes[orientation] = "compiled"
                logger.info("warmed up %s (%dx%d) in %.1f s%s", orientation, w, h,
                            time.perf_counter() - started, self._saved_blocks())
            else:
                self.shapes[orientation] = "compiling"
                pending.append((orientation, keys))
                logger.info("%s (%dx%d) runs eagerly (warmed in %.1f s) while its %d compiled "
                            "blocks are built in the background", orientation, w, h,
                            time.perf_counter() - started, len(keys))
        if pending:
            threading.Thread(target=self._compile_in_background, args=(pending,),
                             name="background-compile", daemon=True).start()

    def _missed_blocks(self, orientation: str) -> set:
        """The blocks a warm-up step of this shape still runs uncompiled (the engine's lock
        held, or before serving)."""
        w, h = self._size(orientation)
        with self.generator.saved_regions.missed() as keys:
            self.generator.warm_up(self.variant.num_frames, h, w, self.variant.min_guidance_scale,
                                   self.variant.max_guidance_scale)
        return keys

    def _compile_in_background(self, pending: list[tuple[str, set]]) -> None:
        """Build each shape's blocks; between two requests put them to use and check with a
        warm-up step which blocks still miss (their inputs' layout changed now that the
        blocks before them run compiled), until none do."""
        regions = self.generator.saved_regions
        for orientation, keys in pending:
            w, h = self._size(orientation)
            started, rounds = time.perf_counter(), 0
            try:
                while keys and rounds < MAX_ROUNDS:
                    # Block by block, each between two requests (GpuTurns says why).
                    regions.build(keys, turn=self.turns.background)
                    rounds += 1
                    with self.turns.background():
                        regions.adopt()
                        keys = self._missed_blocks(orientation)
            except Exception:
                logger.exception("building the compiled blocks of %s failed; its requests keep "
                                 "running eagerly", orientation)
                self.shapes[orientation] = "eager"
                continue
            self.shapes[orientation] = "compiled"
            logger.info("compiled %s (%dx%d) in the background in %.1f s, %d round%s%s; its "
                        "requests run compiled from the next one", orientation, w, h,
                        time.perf_counter() - started, rounds, "" if rounds == 1 else "s",
                        self._saved_blocks())

    def _size(self, orientation: str) -> tuple[int, int]:
        """(width, height) of a WARMUP shape."""
        size = (self.variant.width, self.variant.height)
        return size if orientation == "landscape" else size[::-1]

    def _run_once(self, height: int, width: int, steps: int = 1) -> None:
        """`steps` denoising steps of a whole request at this shape, its frames decoded one
        at a time (decoding_t 1, the default) and encoded as an MP4."""
        variant = self.variant
        job = GenerationSettings(
            num_frames=variant.num_frames, num_inference_steps=steps,
            min_guidance_scale=variant.min_guidance_scale,
            max_guidance_scale=variant.max_guidance_scale, fps=7, motion_bucket_id=127,
            noise_aug_strength=0.02, decode_chunk_size=1, seed=0)
        frames = self.generator.generate(np.zeros((height, width, 3), np.uint8), job)
        encode_output(frames, OutputSpec(format="mp4", fps=7), crf=self.settings.video_crf,
                      preset=self.settings.video_preset)
        if self.rife is not None:  # its kernels' first call too (cuDNN's algorithm search)
            StreamingInterpolation(self.rife, 2, 1, 2).feed(
                torch.zeros(2, height, width, 3, dtype=torch.uint8, device=self.generator.device))

    def _saved_blocks(self) -> str:
        """How the compiled blocks got their code so far, for the warm-up's log line."""
        regions = self.generator.saved_regions
        if regions is None:
            return ""
        counts = ", ".join(f"{n} {what}" for what, n in sorted(regions.counts.items()))
        return f" (compiled blocks: {counts or 'none built'})"

    @property
    def alive(self) -> bool:
        return self.faults_in_a_row < self.settings.max_faults_in_a_row

    def interpolation(self, job: GenerationSettings, output: OutputSpec) -> StreamingInterpolation | None:
        """RIFE for this request's frames, as `output` asks (None: none, or minterpolate
        in the encode)."""
        if output.interpolation != "rife" or not output.interpolate_fps:
            return None
        if self.rife is None:  # the API checked; a worker started without the model says so
            raise RuntimeError("RIFE was asked for but this worker has no RIFE model")
        return StreamingInterpolation(self.rife, job.num_frames, output.fps, output.interpolate_fps)

    def run(self, image: np.ndarray, job: GenerationSettings, deadline: float,
            caller_gone: threading.Event, report, on_frames=None,
            request_id: str = "", interpolation: StreamingInterpolation | None = None) -> Frames | Failed:
        """Generate the frames of `job`. `report(event)` gets `Started` once the GPU is
        this request's and `Step` after each step; `on_frames(chunk)` gets the decoded
        frames chunk by chunk (`VideoGenerator.generate`), interpolated by `interpolation`
        if given. Stops at the next step once `caller_gone` is set or `deadline` (epoch
        seconds) passes."""
        def check(step: int = 0, total: int = 0) -> None:
            if caller_gone.is_set():
                raise Stopped(FailureKind.CANCELLED,
                              f"the caller left or cancelled (step {step}/{total})")
            if time.time() > deadline:
                raise Stopped(FailureKind.TIMEOUT, f"the deadline passed (step {step}/{total})")
            if self.injected_faults[:1] in (["gpu_oom"], ["internal"]):  # tests: a fault mid-generation
                if self.injected_faults.pop(0) == "gpu_oom":
                    raise torch.cuda.OutOfMemoryError("injected CUDA out of memory")
                raise RuntimeError("injected unexpected error")
            if step:
                report(Step(step=step, total=total))

        arrived = time.perf_counter()
        with self.turns.request():
            timings = {"gpu_wait": time.perf_counter() - arrived}
            try:
                check()  # the caller may have left while this request waited for the GPU
                report(Started())
                if self.busy_gauge is not None:
                    self.busy_gauge.inc()
                if self.on_gpu:
                    torch.cuda.reset_peak_memory_stats(self.generator.device)
                try:
                    frames = self.generator.generate(image, job, on_step=check, timings=timings,
                                                     on_frames=on_frames, interpolation=interpolation)
                finally:
                    if self.busy_gauge is not None:
                        self.busy_gauge.dec()
            except Stopped as e:
                logger.info("generation stopped: %s", e)
                return Failed(kind=e.kind, message=f"generation stopped: {e}")
            except torch.cuda.OutOfMemoryError as e:
                self.faults_in_a_row += 1
                self._free_gpu_memory()
                logger.error("GPU out of memory (%d in a row): %s", self.faults_in_a_row, e)
                return Failed(kind=FailureKind.GPU_OOM, message=str(e)[:500])
            except Exception as e:
                # A bug, not a passing condition: the caller gets a 500 (trying again would
                # fail the same way) and the traceback stays in the log.
                self.faults_in_a_row += 1
                self._free_gpu_memory()
                logger.exception("generation of %s failed (%d faults in a row)", request_id,
                                 self.faults_in_a_row)
                return Failed(kind=FailureKind.INTERNAL, message=f"{type(e).__name__}: {str(e)[:200]}")
        self.faults_in_a_row = 0
        peak = torch.cuda.max_memory_allocated(self.generator.device) if self.on_gpu else None
        return Frames(frames=frames, timings=timings, gpu_peak_bytes=peak)

    def encoder(self, job: GenerationSettings, image: np.ndarray,
                output: OutputSpec) -> StreamingEncode:
        """A video encode for `job`'s frames, to be fed by `run`'s on_frames. With RIFE the
        frames come interpolated already: encoded as they are, at interpolate_fps."""
        shape = (job.num_frames, *image.shape[:2], 3)
        if output.interpolation == "rife" and output.interpolate_fps:
            count = len(times_for_fps(job.num_frames, output.fps, output.interpolate_fps))
            shape = (count, *shape[1:])
            output = output.model_copy(update=dict(fps=output.interpolate_fps, interpolate_fps=None))
        stall = self.injected_faults[:1] == ["encode_stall"]
        if stall:
            self.injected_faults.pop(0)
        return (_StalledEncode if stall else StreamingEncode)(
            shape, output, crf=self.settings.video_crf, preset=self.settings.video_preset)

    def _free_gpu_memory(self) -> None:
        # The failed step's tensors are garbage once its frames are gone; hand their
        # blocks back to the driver so the next request starts from a clean pool.
        gc.collect()
        if self.on_gpu:
            torch.cuda.empty_cache()


class _StalledEncode(StreamingEncode):
    """Tests (INJECT_FAULTS `encode_stall`): an encode whose result never comes, as with an
    FFmpeg stuck in its thread, until it is abandoned."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._abandoned = threading.Event()

    def result(self) -> bytes:
        self._abandoned.wait()
        raise RuntimeError("the stalled encode was abandoned")

    def close(self) -> None:
        self._abandoned.set()
        super().close()
