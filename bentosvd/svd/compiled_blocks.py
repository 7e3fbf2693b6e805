"""The UNet's blocks and the VAE's decoder compiled ahead of time and kept on disk.

Compiled block by block (`compile_regions`), a restart still traces every block (and the
decoder) again with Dynamo for each image orientation while Inductor's cache hands back
the kernels, and that tracing is a large share of a restart. torch.compile's
`aot_compile` instead captures a block's forward once (Dynamo's bytecode and guards with
Inductor's compiled code) into a file that a new process loads without tracing, so a
restart's warm-ups mostly just run (docs/performance.md, saved compiled blocks).

One file per block class, block configuration and input shapes: blocks of one class and
configuration share it, as their compiled code is the same; the weights are not in it
(they are read from the block at each call). The file's name also covers the versions of
torch, CUDA, Triton and diffusers, the GPU and the source of the classes involved, so
that an upgrade compiles afresh instead of loading stale code; a file that cannot be
loaded, or whose code fails on its first call, is compiled again and replaced.

Each call still checks the compiled code's guards (grad mode, input strides, parameter
shapes); a call they reject, like any input shape not compiled while `may_build()` says
so (the warm-up), runs the block eagerly rather than compiling inside a request. A block
that `aot_compile` cannot capture (or a torch without it) is compiled in-process as
`compile_regions` does, so a failure costs restart time, never the service.

Blocks can also be built in the background while requests run eagerly (a fresh node
serving before its compile is done): a call that finds no compiled code while building is
not allowed records what it would need (`wanted`, and `missed()` collects such calls);
`build` then makes that code from inputs of the recorded layouts in another thread, each
block between two requests, and stages it, and `adopt`, called between requests, puts it
to use. A block's input layout
(its strides) can depend on whether the block before it ran compiled, so a run after
`adopt` may miss blocks again: the caller builds in rounds until a run misses none.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.metadata
import logging
import sys
import threading
import time
import types
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch

from bentosvd.svd.accel.channels_last import channels_last_output

logger = logging.getLogger("bentoml.svd")

# Bump when what goes into a file changes in a way its name does not show.
FORMAT = 1


def _own_forward(block: torch.nn.Module) -> Callable:
    return type(block).forward


class SavedRegions:
    """Takes over the forward of each of `blocks`: `forward_of(block)`, a function of the
    block and its inputs (by default its class's forward), is what is compiled and, where
    nothing compiled applies, run eagerly."""

    def __init__(self, blocks: list[torch.nn.Module], cache_dir: Path,
                 may_build: Callable[[], bool] = lambda: True,
                 forward_of: Callable[[torch.nn.Module], Callable] = _own_forward):
        self.cache_dir, self.may_build = Path(cache_dir), may_build
        # Files loaded, compiled (and saved), and blocks compiled in-process instead.
        self.counts: Counter[str] = Counter()
        # key -> (compiled callable or None for eager, whether its guards are to be checked)
        self._functions: dict[tuple, tuple[Callable | None, bool]] = {}
        self._in_process: dict[Callable, Callable] = {}  # forward -> torch.compile'd forward
        # Calls that found nothing compiled while building was not allowed: key -> what
        # building it needs (block, forward, input specs); built ones waiting for `adopt`.
        self.wanted: dict[tuple, tuple] = {}
        self._missed: set | None = None  # while `missed()` collects
        self._staged: dict[tuple, tuple[Callable | None, bool]] = {}
        self._lock = threading.Lock()
        self._blocks = list(blocks)
        # The in-process fallback keeps one compiled version per forward and shape.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
        for block in self._blocks:
            forward = forward_of(block)
            # What the block's compiled code depends on besides its inputs, digested once.
            identity = _hash(repr((_structure(block), _sources_digest(block), _function_digest(forward))))
            # The class's forward stays as it is: this instance's forward is the dispatcher.
            block.forward = functools.partial(self._call, block, identity, forward)

    def remove(self) -> None:
        """Give the blocks their own forward back."""
        for block in self._blocks:
            block.__dict__.pop("forward", None)

    def _call(self, block: torch.nn.Module, identity: str, forward: Callable, *args, **kwargs):
        key = (identity, _describe(args), _describe(sorted(kwargs.items())), torch.is_grad_enabled())
        if key not in self._functions:
            if not self.may_build():
                if key not in self.wanted:
                    with self._lock:
                        self.wanted[key] = (block, forward, _spec(args), _spec(kwargs))
                if self._missed is not None:
                    self._missed.add(key)
                return forward(block, *args, **kwargs)
            self._functions[key] = self._build(key, block, forward, args, kwargs)
        fn, guarded = self._functions[key]
        if fn is None:
            return forward(block, *args, **kwargs)
        if guarded and not fn.guard_check(block, *args, **kwargs):
            # The key covers what the guards check; this is a safety net, not a path.
            logger.warning("the compiled %s rejected its inputs; these run eagerly from now on",
                           type(block).__name__)
            self._functions[key] = (None, False)
            return forward(block, *args, **kwargs)
        return fn(block, *args, **kwargs)

    # -------------------------------------------------------------- in the background

    @contextlib.contextmanager
    def missed(self):
        """Collect the keys of the calls in this block that found nothing compiled (and were
        recorded in `wanted`): `with regions.missed() as keys: ...`."""
        self._missed = keys = set()
        try:
            yield keys
        finally:
            self._missed = None

    def saved(self, keys) -> bool:
        """Whether each of these wanted keys has its file (a start that can load them all
        at once instead of serving eagerly first)."""
        return all((self.cache_dir / self._file_name(key, self.wanted[key][0])).exists()
                   for key in keys)

    def build(self, keys, turn: Callable[[], contextlib.AbstractContextManager] =
              contextlib.nullcontext) -> None:
        """Make the compiled code of these wanted keys (load its file, or compile and save
        it) from inputs of the recorded shapes, and stage it for `adopt`. From a thread of
        its own, each key's build must not overlap a call of the model in another thread
        (torch.fx's tracer patches `torch.nn.Module.__call__` process-wide while it traces):
        `turn()` is entered around each one, e.g. the lock the model's callers hold."""
        built = {}
        for key in keys:
            with self._lock:
                block, forward, args, kwargs = self.wanted[key]
            args, kwargs = _materialise(args), _materialise(kwargs)
            with turn(), torch.set_grad_enabled(key[3]):
                fn, guarded = self._build(key, block, forward, args, kwargs)
                if not guarded:  # compiled in-process: its compile happens at its first call
                    fn(block, *args, **kwargs)
            built[key] = (fn, guarded)
        with self._lock:  # all at once: a request never runs some of them only
            self._staged.update(built)

    def adopt(self) -> int:
        """Put the staged code to use (call between requests, never during one); the number
        of blocks whose code changed."""
        with self._lock:
            staged, self._staged = self._staged, {}
            for key in staged:
                self.wanted.pop(key, None)
        self._functions.update(staged)
        return len(staged)

    # -------------------------------------------------------------- files on disk

    def _file_name(self, key: tuple, block: torch.nn.Module) -> str:
        return f"{type(block).__name__}-{_digest(key, block)}.bin"

    def _build(self, key: tuple, block: torch.nn.Module, forward: Callable, args: tuple, kwargs: dict):
        name = type(block).__name__
        path = self.cache_dir / self._file_name(key, block)
        if path.exists():
            try:
                fn = _load(path)
                if not fn.guard_check(block, *args, **kwargs):
                    raise RuntimeError("its guards reject these inputs")
                # Run once before it is trusted: kernels built for another driver or GPU
                # set-up load but fail here, where compiling again still helps.
                fn(block, *args, **kwargs)
                self.counts["loaded"] += 1
                logger.debug("loaded the compiled %s from %s", name, path)
                return fn, True
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:
                logger.warning("could not load %s (%s: %s); compiling it again", path,
                               type(e).__name__, str(e).strip().split("\n")[0][:300])
        started = time.perf_counter()
        try:
            fn = _compile(forward, block, args, kwargs)
        except Exception as e:
            self.counts["in_process"] += 1
            logger.warning("could not compile %s ahead of time (%s: %s); compiling it in-process",
                           name, type(e).__name__, str(e).strip().split("\n")[0][:300])
            return self._in_process_compiled(forward), False
        self.counts["compiled"] += 1
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fn.save_compiled_function(str(path))  # written to a temporary file, then renamed
        except Exception as e:
            logger.warning("could not save the compiled %s to %s: %s", name, path, e)
        logger.info("compiled %s ahead of time in %.1f s: %s", name, time.perf_counter() - started, path)
        return fn, True

    def _in_process_compiled(self, forward: Callable) -> Callable:
        if forward not in self._in_process:
            self._in_process[forward] = torch.compile(forward, dynamic=False)
        return self._in_process[forward]


def _compile(forward: Callable, block: torch.nn.Module, args: tuple, kwargs: dict):
    if hasattr(torch._dynamo.config, "enable_aot_compile"):
        torch._dynamo.config.enable_aot_compile = True  # off by default in some torch versions
    compiled = torch.compile(forward, fullgraph=True, dynamic=False,
                             options={"guard_filter_fn": _portable_guards})
    if not hasattr(compiled, "aot_compile"):
        raise RuntimeError(f"torch {torch.__version__} has no torch.compile(...).aot_compile")
    # The block goes into the saved guards' state: without the dispatcher set as its
    # forward, which holds the compiled functions (their guard managers do not pickle).
    # Traced on a shallow copy (the same parameters and submodules) that lacks it, so that
    # the block itself keeps its dispatcher while another thread runs it.
    traced = copy.copy(block)
    traced.__dict__ = dict(block.__dict__)
    traced.__dict__.pop("forward", None)
    fn = compiled.aot_compile(((traced, *args), kwargs))
    fn.disable_guard_check()  # checked once per call by SavedRegions._call instead
    return fn


def _portable_guards(entries) -> list[bool]:
    """Keep the guards on the global state (grad mode, ...) and on the tensors (inputs,
    parameters); drop those on objects' identity and attributes, which do not survive a
    new process. What they checked is in the file's key instead (`_structure`)."""
    return [e.guard_type in ("GLOBAL_STATE", "SHAPE_ENV")
            or (e.guard_type == "TENSOR_MATCH" and not e.is_global) for e in entries]


def _load(path: Path):
    with open(path, "rb") as f:
        fn = torch.compiler.load_compiled_function(f)
    fn.disable_guard_check()
    return fn


def _structure(block: torch.nn.Module) -> tuple:
    """What the compiled code of a block depends on besides its inputs: each submodule's
    class, plain attributes (sizes, heads, flags; the classes of other objects such as
    attention processors) and parameter and buffer shapes and layouts (the saved guards
    check their strides: channels-last weights get files of their own); not the weights'
    values."""
    rows = []
    for name, module in block.named_modules():
        attributes = tuple(sorted(
            (k, v if isinstance(v, (int, float, str, bool, type(None))) else _qualname(type(v)))
            for k, v in vars(module).items() if not k.startswith("_")))
        tensors = tuple((n, tuple(t.shape), t.stride(), str(t.dtype), str(t.device))
                        for n, t in [*module.named_parameters(recurse=False),
                                     *module.named_buffers(recurse=False)] if t is not None)
        rows.append((name, _qualname(type(module)), attributes, tensors))
    return tuple(rows)


def _sources_digest(block: torch.nn.Module) -> str:
    """A digest of the source files of the block's classes and of their attributes' classes
    (attention processors), so that changed code is compiled afresh."""
    modules = set()
    for module in block.modules():
        modules.add(type(module).__module__)
        modules.update(type(v).__module__ for k, v in vars(module).items() if not k.startswith("_"))
    return _hash(" ".join(f"{name}:{_module_source_digest(name)}" for name in sorted(modules)))


def _function_digest(fn: Callable) -> str:
    """The function compiled for a block: its name and its module's source."""
    return f"{fn.__module__}.{fn.__qualname__}:{_module_source_digest(fn.__module__)}"


@functools.cache
def _module_source_digest(name: str) -> str:
    """A digest of a loaded module's source file (read once per process), or of nothing."""
    file = getattr(sys.modules.get(name), "__file__", None)
    return hashlib.sha256(Path(file).read_bytes() if file and file.endswith(".py") else b"").hexdigest()


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _describe(value) -> object:
    """A hashable description of a call's arguments: tensors by layout, not by value."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), str(value.dtype), str(value.device),
                value.requires_grad)
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v) for v in value)
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    return _qualname(type(value))


class _TensorSpec(tuple):
    """A recorded input tensor's layout: (shape, stride, dtype, device, requires_grad)."""


def _spec(value):
    """`value` with its tensors replaced by their layout (the values are not kept)."""
    if isinstance(value, torch.Tensor):
        return _TensorSpec((tuple(value.shape), value.stride(), value.dtype, value.device,
                            value.requires_grad))
    if isinstance(value, (list, tuple)):
        return type(value)(_spec(v) for v in value)
    if isinstance(value, dict):
        return {k: _spec(v) for k, v in value.items()}
    return value


def _materialise(value):
    """An input of the recorded layout (its values arbitrary) for each spec in `value`."""
    if isinstance(value, _TensorSpec):
        shape, stride, dtype, device, requires_grad = value
        # Storage for the layout, broadcast (zero) strides included; filled, not left
        # uninitialised: NaNs would make a trial call misleading.
        size = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if all(shape) else 0
        storage = (torch.randn(size, device=device).to(dtype) if dtype.is_floating_point
                   else torch.zeros(size, dtype=dtype, device=device))
        return storage.as_strided(shape, stride).requires_grad_(requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_materialise(v) for v in value)
    if isinstance(value, dict):
        return {k: _materialise(v) for k, v in value.items()}
    return value


def _digest(key: tuple, block: torch.nn.Module) -> str:
    device = next((t.device for t in block.parameters()), torch.device("cpu"))
    system = (FORMAT, torch.__version__, diffusers.__version__, torch.version.cuda,
              _installed_version("triton"),
              torch.cuda.get_device_name(device) if device.type == "cuda" else device.type)
    return _hash(repr((system, key)))[:24]


@functools.cache
def _installed_version(package: str) -> str | None:
    """The package's installed version (whether imported yet or not), or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def folder(compile_cache_dir: str | Path) -> Path:
    """Where the compiled blocks are kept: a folder of torch.compile's own cache."""
    return Path(compile_cache_dir).expanduser() / "aot"


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# The UNet's repeated blocks, which do nearly all of its work.
UNET_REGIONS = ("SpatioTemporalResBlock", "TransformerSpatioTemporalModel")


def region_forward(block: torch.nn.Module, channels_last: bool) -> Callable:
    """What is compiled for a block: its class's forward, with `channels_last` its output
    made channels-last (`bentosvd.svd.accel.channels_last`)."""
    own = type(block).forward
    return channels_last_output(own) if channels_last else own


def compile_regions(model: torch.nn.Module, class_names: tuple[str, ...],
                    channels_last: bool = False) -> None:
    """torch.compile each block of these classes on its own (with `channels_last`, its
    output made channels-last: `bentosvd.svd.accel.channels_last`). Dynamo keeps one
    compiled version per (class, input shapes), shared by the blocks that match it; SVD's
    UNet needs a few dozen of them for two image shapes, more than Dynamo's default limit
    of 8 per function, after which it would silently run the rest eagerly."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
    for module in model.modules():
        if type(module).__name__ in class_names:
            module.forward = types.MethodType(region_forward(module, channels_last), module)
            module.compile(dynamic=False)
