"""Classifier-free guidance split over two devices (CFG_PARALLEL=2).

With guidance, every denoising step runs the UNet on a batch of two: the unconditional
half (zero image embedding, zero image latents) and the conditional half. The halves are
independent until the guidance mix, so a pair of devices can each run one: the serving
process (the leader) keeps the conditional half and everything else (image encode, VAE
decode, video encode), and a peer process on the second device runs the unconditional
half. Per step the leader sends the peer its half's UNet inputs (one broadcast) and both
exchange their noise predictions (one all-gather); the result is the batched forward's
within float rounding.

`GuidancePair` is the leader's side; `take_over(unet)` routes the UNet's two-sample calls
through the pair and leaves one-sample calls (guidance 1) on the leader. The peer holds
only the UNet, with the leader's speed-ups, and keeps no state between steps: a step the
leader does not send (a cancelled or timed-out request stops between steps) costs it
nothing, and it waits for the next one. Control messages go over a pipe, tensors over a
torch.distributed group (NCCL on CUDA, gloo on the CPU), so that an idle peer holds no
collective open.

A peer that dies, fails to load, or does not finish a step within the timeout fails that
step with `GuidancePeerError` (a peer out of GPU memory: `torch.cuda.OutOfMemoryError`,
and the pair stays up); the pair is then torn down and a new peer starts loading at once,
for the next step that needs it.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.models.unets.unet_spatio_temporal_condition import (
    UNetSpatioTemporalConditionOutput,
)

from bentosvd.svd.loading import weights_variant, resolve_device
from bentosvd.svd.speedups import Speedups

logger = logging.getLogger("bentoml.svd")

# Ranks in the process group: all_gather_single then stacks the halves in the pipeline's
# batch order (unconditional, conditional) with no copy.
PEER, LEADER = 0, 1
# How long a step may wait for the peer when the peer may compile that step's shape (the
# warm-up, cold: minutes), and for a new peer to import torch and load its UNet.
COMPILE_WAIT = 900.0
START_WAIT = 900.0


class GuidancePeerError(RuntimeError):
    """The peer process died, failed or did not answer in time; the step that needed it
    fails, and a new peer is started for the next one."""


def pair_devices(device: str, index: int) -> tuple[torch.device, torch.device]:
    """(leader, peer) devices of worker `index` for a DEVICE setting of auto, cuda or cpu:
    cuda:2i and cuda:2i+1 of the GPUs the worker sees (BentoML hands each worker its pair
    through CUDA_VISIBLE_DEVICES, so they are cuda:0 and cuda:1 there); on the CPU both are
    the CPU."""
    first, second = (resolve_device("auto" if device == "cuda" else device, 2 * index + k)
                     for k in (0, 1))
    if device == "cuda" and first.type != "cuda":
        raise ValueError("DEVICE=cuda but torch sees no CUDA device")
    if first.type == "cuda" and first == second:
        raise ValueError(f"CFG_PARALLEL=2 needs two GPUs per worker; this worker sees "
                         f"{torch.cuda.device_count()}")
    return first, second


def load_unet(folder: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The UNet saved in `folder` (the model store's `pipeline/unet`), as `load_parts`
    loads it for the leader. Picklable with functools.partial: a peer's `load_unet`."""
    unet = UNetSpatioTemporalConditionModel.from_pretrained(
        folder, variant=weights_variant(Path(folder)), torch_dtype=dtype)
    return unet.to(device).eval().requires_grad_(False)


class GuidancePair:
    """The leader's side of a pair: starts the peer process on `peer_device` at once (it
    loads while the leader does) and runs the unconditional half of each guided UNet call
    there once `take_over(unet)` is called.

    load_unet: called in the peer with its device; must give the leader's UNet weights
        (e.g. `functools.partial(load_unet, folder, dtype)`), and be picklable.
    speedups: the leader's; the peer applies the same kernel shortcuts and compiles its
        UNet's blocks the same way (the warm-up compiles both halves at once).
    cache_dir: where compiled blocks are kept (`compiled_blocks.folder`), with
        save_compiled.
    timeout: seconds a step may wait for the peer once the leader's half is queued; the
        warm-up's steps, which may compile, wait up to COMPILE_WAIT.
    """

    def __init__(self, device: torch.device, peer_device: torch.device,
                 load_unet: Callable[[torch.device], torch.nn.Module],
                 speedups: Speedups = Speedups(), cache_dir: Path | None = None,
                 timeout: float = 60.0):
        self.device, self.peer_device = torch.device(device), torch.device(peer_device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self._load_unet, self._speedups, self._cache_dir = load_unet, speedups, cache_dir
        self.timeout = timeout
        self._process = self._conn = self._store = None
        self._connected = False
        # Shapes (frames, height, width) the peer may compile: those sent while the
        # leader's warm-up compiled; a new peer compiles (or loads) them again.
        self._compiled_shapes: set[tuple[int, int, int]] = set()
        self._peer_shapes: set[tuple[int, int, int]] = set()  # seen by this peer
        self._may_build: Callable[[], bool] = lambda: False
        self._lock = threading.Lock()
        self._start()
        atexit.register(self.close)

    # ------------------------------------------------------------------ the UNet hook

    def take_over(self, unet: torch.nn.Module,
                  may_build: Callable[[], bool] = lambda: False) -> None:
        """Run `unet`'s two-sample calls (unconditional, conditional) as a pair from now
        on; one-sample calls stay on the leader. `may_build()` says whether new shapes
        may compile now (the leader's warm-up); the peer follows it."""
        forward = unet.forward
        self._may_build = may_build

        def paired(sample, timestep, encoder_hidden_states, added_time_ids, return_dict=True):
            if sample.shape[0] != 2:
                return forward(sample, timestep, encoder_hidden_states, added_time_ids,
                               return_dict=return_dict)
            per_sample = (torch.is_tensor(timestep) and timestep.ndim > 0
                          and timestep.shape[0] == 2)
            # (unconditional, conditional) of each input: the first goes to the peer.
            theirs, ours = zip(*[
                (x[:1], x[1:]) for x in (sample, encoder_hidden_states, added_time_ids)])
            times = (timestep[:1], timestep[1:]) if per_sample else (timestep, timestep)
            with self._lock:
                sent = self._send_step(theirs[0], times[0], *theirs[1:])
                try:
                    mine = forward(ours[0], times[1], *ours[1:], return_dict=False)[0]
                except BaseException:
                    self._abandon(sent, sample, unet.config.out_channels)
                    raise
                both = self._gather(mine, sent)
            return UNetSpatioTemporalConditionOutput(sample=both) if return_dict else (both,)

        unet.forward = paired

    def _send_step(self, sample, timestep, hidden, time_ids) -> dict:
        """Tell the peer about this step and start sending it the unconditional half."""
        self._ensure_peer()
        shape = (sample.shape[1], *sample.shape[-2:])
        if self._speedups.compile_unet and self._may_build():
            self._compiled_shapes.add(shape)
        compile_ok = shape in self._compiled_shapes
        tensors = [sample, hidden, time_ids]
        number = None
        if torch.is_tensor(timestep):
            tensors.append(timestep)
        else:
            number = timestep
        payload, specs = _pack(tensors)
        try:
            self._conn.send(("step", specs, payload.numel(), number, compile_ok))
            work = dist.broadcast(payload, src=LEADER, async_op=True)
        except (OSError, RuntimeError) as e:
            self._fail(f"sending the step failed ({type(e).__name__}: {e})")
        # A step that may compile on the peer waits as long as a compile takes.
        limit = COMPILE_WAIT if compile_ok and shape not in self._peer_shapes else self.timeout
        self._peer_shapes.add(shape)
        return {"payload": payload, "work": work, "limit": limit}

    def _gather(self, mine: torch.Tensor, sent: dict) -> torch.Tensor:
        """Both halves' noise predictions, (unconditional, conditional), once the peer's
        has arrived; raises if it does not come."""
        mine = mine.contiguous()
        both = torch.empty((2, *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
        try:
            work = dist.all_gather_single(both, mine, async_op=True)
        except RuntimeError as e:
            self._fail(f"the exchange failed ({e})")
        self._wait([sent["work"], work], sent["limit"])
        if self._conn.poll():  # the peer's half failed; what it sent instead is zeros
            message = self._conn.recv()
            if message[0] == "error":
                _, kind, text = message
                if kind == "gpu_oom":
                    raise torch.cuda.OutOfMemoryError(
                        f"the guidance peer on {self.peer_device}: {text}")
                raise GuidancePeerError(f"the guidance peer on {self.peer_device} failed: {text}")
        return both

    def _abandon(self, sent: dict, sample: torch.Tensor, channels: int) -> None:
        """End a step whose own half failed (out of memory, say) with zeros for it, so that
        the peer finishes the step and waits for the next one; the caller raises the
        failure. A pair that fails here too is torn down and started again."""
        zeros = sample.new_zeros((1, sample.shape[1], channels, *sample.shape[3:]))
        try:
            self._gather(zeros, sent)
        except Exception as e:
            logger.warning("the guidance peer did not finish the failed step either: %s", e)

    def _wait(self, works: list, limit: float) -> None:
        """Wait for the collectives, checking that the peer lives and answers in time. The
        wait polls rather than blocks so that a dead or stuck peer is noticed: a blocked
        NCCL collective would otherwise wait for the group's own, longer, timeout."""
        deadline = time.monotonic() + limit
        pause = 1e-4
        while not all(w.is_completed() for w in works):
            if not self._process.is_alive():
                self._fail(self._death())
            if time.monotonic() > deadline:
                self._fail(f"the guidance peer on {self.peer_device} did not finish its half "
                           f"of the step within {limit:g} s")
            time.sleep(pause)
            pause = min(2 * pause, 2e-3)
        for w in works:
            try:
                w.wait()
            except RuntimeError as e:  # gloo: the peer's connection closed
                self._process.join(1)
                self._fail(self._death() if not self._process.is_alive()
                           else f"the exchange failed ({e})")

    # ------------------------------------------------------------------ the peer's life

    def _start(self) -> None:
        """Spawn a peer; it loads its UNet while the caller goes on."""
        self._store = dist.TCPStore("127.0.0.1", 0, world_size=2, is_master=True,
                                    timeout=datetime.timedelta(seconds=START_WAIT),
                                    wait_for_workers=False)
        context = mp.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_peer_main, name="guidance-peer", daemon=False,
            args=(child, self._store.port, self.backend, self.peer_device, self._load_unet,
                  self._speedups, self._cache_dir, self._group_timeout(),
                  torch.get_num_threads()))
        self._process.start()
        child.close()  # the peer's end is the peer's alone: its exit closes the pipe here
        self._connected = False
        self._peer_shapes = set()
        logger.info("started the guidance peer (pid %d) on %s", self._process.pid, self.peer_device)

    def _group_timeout(self) -> datetime.timedelta:
        # Longer than any wait of the leader's: the leader gives up first, on its terms.
        return datetime.timedelta(seconds=COMPILE_WAIT + self.timeout + 60)

    def _ensure_peer(self) -> None:
        """A peer, loaded and in the process group, for the next step."""
        if self._process is None:
            self._start()
        if not self._process.is_alive():
            self._fail(self._death())
        if self._connected:
            return
        started = time.monotonic()
        while not self._conn.poll(0.05):
            if not self._process.is_alive():
                self._fail(self._death())
            if time.monotonic() - started > START_WAIT:
                self._fail(f"the guidance peer on {self.peer_device} did not load within "
                           f"{START_WAIT:g} s")
        message = self._conn.recv()
        if message[0] != "ready":
            self._fail(f"the guidance peer on {self.peer_device} could not load its UNet:\n"
                       f"{message[1]}")
        kwargs = {"device_id": self.device} if self.backend == "nccl" else {}
        dist.init_process_group(self.backend, store=self._store, rank=LEADER, world_size=2,
                                timeout=self._group_timeout(), **kwargs)
        self._connected = True
        logger.info("the guidance peer on %s is ready (%.1f s waited)", self.peer_device,
                    time.monotonic() - started)

    def _death(self) -> str:
        self._process.join(1)
        code = self._process.exitcode
        how = (f"was killed by signal {-code}" if code is not None and code < 0
               else f"exited with code {code}")
        return f"the guidance peer process (pid {self._process.pid}, {self.peer_device}) {how}"

    def _fail(self, reason: str):
        """Tear the pair down, start a new peer for the next step, raise `reason`."""
        logger.error("%s; starting a new guidance peer", reason)
        self._teardown()
        self._start()
        raise GuidancePeerError(reason)

    def _teardown(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
        if self._process is not None:
            self._process.join(10)
        if dist.is_initialized():
            if self.backend == "nccl":
                # NCCL's pending collectives wait on the dead peer: aborting releases them.
                dist.distributed_c10d._abort_process_group()
            else:
                dist.destroy_process_group()
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = self._store = None
        self._connected = False

    def peer_state(self) -> dict:
        """The peer's pid and the steps it has run (health and tests); call between
        generations."""
        with self._lock:
            self._ensure_peer()
            self._conn.send(("state",))
            if not self._conn.poll(self.timeout):
                self._fail(f"the guidance peer on {self.peer_device} did not answer")
            return {"pid": self._process.pid, **self._conn.recv()[1]}

    def close(self) -> None:
        """Stop the peer (at exit, or when the engine goes)."""
        if self._process is None:
            return
        if self._connected:  # a peer still loading reads no messages: it is just stopped
            try:
                self._conn.send(("shutdown",))
                self._process.join(5)
            except (OSError, ValueError):
                pass
        self._teardown()


def _pack(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list]:
    """The tensors' bytes in one uint8 buffer on their device (one broadcast), each
    starting at a multiple of 8 bytes, and how to cut them out again."""
    pieces, specs, offset = [], [], 0
    for t in tensors:
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        pad = -raw.numel() % 8
        pieces.append(raw)
        if pad:
            pieces.append(raw.new_zeros(pad))
        specs.append((str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, raw.numel()))
        offset += raw.numel() + pad
    return torch.cat(pieces), specs


def _unpack(payload: torch.Tensor, specs: list) -> list[torch.Tensor]:
    return [payload[offset:offset + size].view(getattr(torch, dtype)).reshape(shape)
            for dtype, shape, offset, size in specs]


# ---------------------------------------------------------------------- the peer process

def _peer_main(conn, port: int, backend: str, device: torch.device, load_unet: Callable,
               speedups: Speedups, cache_dir: Path | None, timeout: datetime.timedelta,
               threads: int) -> None:
    """The peer: load the UNet, join the group, then run the unconditional half of each
    step the leader sends, until it says stop or goes away."""
    # As the worker's own log: diffusers' SVD pipeline imports transformers'
    # CLIPImageProcessor, which without torchvision (not a dependency) says so at every start.
    logging.getLogger("transformers.utils.import_utils").addFilter(
        lambda record: "requires torchvision" not in record.getMessage())
    parent = mp.parent_process()
    # The leader gone (killed, crashed): nothing is left to serve. Its pipe closing wakes a
    # waiting peer, but not one inside a collective.
    threading.Thread(target=lambda: (parent.join(), os._exit(0)), daemon=True).start()
    torch.set_num_threads(threads)
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        unet = load_unet(device)
        step = _PeerStep(unet, device, speedups, cache_dir)
    except BaseException:
        conn.send(("failed", traceback.format_exc()[-3000:]))
        return
    conn.send(("ready",))
    store = dist.TCPStore("127.0.0.1", port, world_size=2, is_master=False, timeout=timeout)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, store=store, rank=PEER, world_size=2, timeout=timeout,
                            **kwargs)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            break
        if message[0] == "shutdown":
            break
        if message[0] == "state":
            conn.send(("state", {"steps": step.count}))
            continue
        error = step(*message[1:])
        if error is not None:
            # Before the exchange, so the leader finds it once the exchange is done.
            conn.send(("error", *error))
        step.exchange()
    dist.destroy_process_group()


class _PeerStep:
    """The peer's UNet with the leader's speed-ups, run on one half per step."""

    def __init__(self, unet, device: torch.device, speedups: Speedups, cache_dir: Path | None):
        from bentosvd.svd.generator import compile_blocks, use_unet_speedups

        self.unet, self.device, self.count = unet, device, 0
        self.compiles, self.compile_ok = speedups.compile_unet, False
        self.compiled_shapes: set = set()
        use_unet_speedups(unet, speedups, device)
        self.saved = compile_blocks(unet, speedups, cache_dir,
                                    may_build=lambda: self.compile_ok) is not None
        if speedups.compile_unet and not speedups.compile_regions:
            unet.compile(dynamic=False)
        self.out = None

    def __call__(self, specs, size: int, number, compile_ok: bool) -> tuple[str, str] | None:
        """Receive this step's half and run the UNet on it; (kind, message) if that failed."""
        payload = torch.empty(size, dtype=torch.uint8, device=self.device)
        dist.broadcast(payload, src=LEADER)
        sample, hidden, time_ids, *rest = _unpack(payload, specs)
        timestep = rest[0] if rest else number
        shape = (sample.shape[1], *sample.shape[-2:])
        self.compile_ok = compile_ok
        if compile_ok:
            self.compiled_shapes.add(shape)
        # As the leader: a shape not compiled during the warm-up runs eagerly rather than
        # compiling inside a request (blocks kept on disk decide per call themselves).
        eager = self.compiles and not self.saved and shape not in self.compiled_shapes
        self.count += 1
        try:
            with torch.no_grad(), (torch.compiler.set_stance("force_eager") if eager
                                   else contextlib.nullcontext()):
                out = self.unet(sample, timestep, hidden, time_ids, return_dict=False)[0]
            self.out = out.contiguous()
            return None
        except Exception as e:
            out_shape = (*sample.shape[:2], self.unet.config.out_channels, *sample.shape[3:])
            self.out = torch.zeros(out_shape, dtype=sample.dtype, device=self.device)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            kind = "gpu_oom" if isinstance(e, torch.cuda.OutOfMemoryError) else "internal"
            return kind, f"{type(e).__name__}: {str(e)[:300]}"

    def exchange(self) -> None:
        both = torch.empty((2, *self.out.shape[1:]), dtype=self.out.dtype, device=self.device)
        dist.all_gather_single(both, self.out)
        self.out = None
