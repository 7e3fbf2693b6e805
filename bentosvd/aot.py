"""The UNet compiled ahead of time: one AOTInductor package per input shape, kept on disk.

torch.compile compiles in the process that runs the model, and even with a warm Inductor
cache each restart traces the UNet again (about 20 s per shape on an H100 machine).
AOTInductor (`torch.export` + `torch._inductor.aoti_compile_and_package`) writes the
compiled kernels and a C++ launcher into a `.pt2` package; a restart loads that package
in seconds. The package holds no weights: they are handed to it from the
loaded model (`load_constants(..., user_managed=True)`, no copy).

With `cuda_graphs`, each shape's step is also captured once as a CUDA graph and replayed,
so the CPU launches a step's ~1000 kernels as one; the graphs of all shapes share one
memory pool (one generation runs at a time).

Only the shapes compiled while `may_build()` says so (the warm-up) run compiled; any
other shape runs the eager UNet rather than compiling for minutes inside a request.

Status: an opt-in pipeline mode (`Speedups(aot_unet=True)`, the benchmark's `aot` modes),
not the server's fast path: on the GPU machines measured so far (torch 2.11.0+cu130)
loading a CUDA package crashed the process (see `load_package`), so there it runs eagerly.
It works on the CPU (tests/test_aot.py), where its cache is tested.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import torch
from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionOutput

logger = logging.getLogger("bentoml.svd")

# Bump when what goes into a package changes in a way its key does not show.
FORMAT = 1


class _ExportedUNet(torch.nn.Module):
    """The UNet's own forward with the pipeline's call signature, returning one tensor."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, added_time_ids):
        return type(self.unet).forward(self.unet, sample, timestep, encoder_hidden_states,
                                       added_time_ids, return_dict=False)[0]


class AotUNet:
    """Takes over `unet.forward`: calls of a compiled shape run its package, others eager."""

    def __init__(self, unet: torch.nn.Module, cache_dir: Path, cuda_graphs: bool = False,
                 may_build: Callable[[], bool] = lambda: True):
        self.unet, self.cache_dir = unet, Path(cache_dir)
        self.module = _ExportedUNet(unet)
        self.cuda_graphs = cuda_graphs
        self.runners: dict[tuple, object] = {}
        self.may_build = may_build
        self._graph_pool = None
        unet.forward = self.forward  # an instance attribute: the class's forward stays eager

    def forward(self, sample, timestep, encoder_hidden_states, added_time_ids, return_dict=True):
        inputs = (sample, torch.as_tensor(timestep, device=sample.device),
                  encoder_hidden_states, added_time_ids)
        key = tuple((tuple(x.shape), str(x.dtype), str(x.device)) for x in inputs)
        if key not in self.runners and self.may_build():
            self.runners[key] = self._runner(inputs, key)
        runner = self.runners.get(key)
        out = runner(*inputs) if runner is not None else self.module(*inputs)
        return UNetSpatioTemporalConditionOutput(sample=out) if return_dict else (out,)

    # -------------------------------------------------------------- packages on disk

    def _runner(self, inputs: tuple, key: tuple):
        """The package for these inputs, loaded from the cache or compiled into it; None
        (eager) if compiling fails, so a broken compiler costs speed, not the service."""
        path = self.cache_dir / f"unet-{self._key_hash(key)}.pt2"
        try:
            runner = self._load(path) or self._compile(path, inputs, key)
        except Exception:
            logger.exception("compiling the UNet ahead of time failed for %s; that shape runs "
                             "eagerly", [k[0] for k in key])
            return None
        if self.cuda_graphs and inputs[0].device.type == "cuda":
            try:
                return self._graphed(runner, inputs)
            except Exception:
                logger.exception("recording the compiled UNet as a CUDA graph failed; it runs "
                                 "without one")
        return runner

    def _key_hash(self, key: tuple) -> str:
        device = key[0][2]
        what = {
            "format": FORMAT, "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "gpu": (torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))
            if device.startswith("cuda") else None,
            "unet": type(self.unet).__name__, "config": dict(self.unet.config),
            "dtype": str(self.unet.dtype), "inputs": key, "weights": self._weights_fingerprint,
        }
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]

    @cached_property
    def _weights_fingerprint(self) -> str:
        """Tells checkpoints of one architecture apart (svd_xt and svd_xt_1_1, say) so they
        keep packages of their own: the bytes of every small tensor (biases, norms, mixing
        factors; a few MiB), not the 3 GiB of the large ones."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self._state.items()):
            if tensor.numel() <= 4096:
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def _load(self, path: Path):
        meta_path = path.with_suffix(".json")
        if not (path.exists() and meta_path.exists()):
            return None
        started = time.perf_counter()
        try:
            runner = load_package(path)
            if json.loads(meta_path.read_text()).get("folded") != self._folded_digest(runner):
                raise ValueError("it was compiled for other weights")
            self._hand_weights(runner)
        except Exception as e:  # stale or partial: compile it again
            logger.warning("not using the compiled UNet %s: %s", path.name, e)
            return None
        logger.info("loaded the compiled UNet %s in %.1f s", path.name, time.perf_counter() - started)
        return runner

    def _compile(self, path: Path, inputs: tuple, key: tuple):
        started = time.perf_counter()
        logger.info("compiling the UNet ahead of time for %s (minutes; kept in %s)",
                    tuple(inputs[0].shape), self.cache_dir)
        with torch.no_grad():
            program = torch.export.export(self.module, inputs, strict=False)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # Written beside the final name and renamed: a crash (or another worker compiling the
        # same shape) never leaves a partial package under the name that is loaded.
        fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".pt2", dir=self.cache_dir)
        os.close(fd)
        try:
            torch._inductor.aoti_compile_and_package(
                program, package_path=tmp,
                inductor_configs={"aot_inductor.package_constants_in_so": False})
            runner = load_package(tmp)
            meta = {"folded": self._folded_digest(runner), "inputs": key}
            self._hand_weights(runner)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        path.with_suffix(".json").write_text(json.dumps(meta))
        logger.info("compiled the UNet ahead of time in %.1f s: %s", time.perf_counter() - started,
                    path.name)
        return runner

    def _hand_weights(self, runner) -> None:
        """Give the package the model's own weight tensors (no copy)."""
        wanted = runner.get_constant_fqns()
        runner.load_constants({name: self._state[name] for name in wanted},
                              check_full_update=True, user_managed=True)

    @cached_property
    def _state(self) -> dict[str, torch.Tensor]:
        return {**dict(self.module.named_parameters()), **dict(self.module.named_buffers())}

    def _folded_digest(self, runner) -> str:
        """A few small tensors (time-mixing factors, say) are folded into a package when it
        is compiled: their bytes, so a package is used only with the weights it was made for."""
        state, wanted = self._state, set(runner.get_constant_fqns())
        if wanted - set(state):
            raise ValueError(f"it needs tensors the model lacks: {sorted(wanted - set(state))[:3]}")
        digest = hashlib.sha256()
        for name in sorted(set(state) - wanted):
            digest.update(name.encode())
            digest.update(state[name].detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    # -------------------------------------------------------------- CUDA graphs

    def _graphed(self, runner, inputs: tuple):
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        return GraphedStep(runner, inputs, self._graph_pool)


def load_package(path) -> object:
    """`aoti_load_package`, first tried in a child process: on the H100/H200 image with torch
    2.11.0+cu130, loading any CUDA package (a two-layer model too) ended the process with a
    segmentation fault, and a worker must not die of an optimisation."""
    check = "import sys, torch; torch._inductor.aoti_load_package(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", check, str(path)], capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"loading the package ended a test process with exit status "
                           f"{done.returncode}: {done.stderr.strip()[-300:]}")
    return torch._inductor.aoti_load_package(str(path))


class GraphedStep:
    """One UNet call recorded as a CUDA graph over fixed input and output buffers."""

    def __init__(self, runner, inputs: tuple, pool):
        self.inputs = [x.clone() for x in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            runner(*self.inputs)  # first-call work (cuBLAS handles, workspaces) outside the graph
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool), torch.no_grad():
            self.output = runner(*self.inputs)

    def __call__(self, *inputs):
        for buffer, x in zip(self.inputs, inputs):
            buffer.copy_(x)
        self.graph.replay()
        return self.output.clone()  # the next replay overwrites the buffer
