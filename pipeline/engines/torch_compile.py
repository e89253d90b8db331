"""Regional compilation of a stage, ahead of time, so a new process loads compiled code instead of tracing.

Each repeated block of a module (FLUX's transformer blocks, the UNet's attention and resnet blocks) is wrapped
in a `CompiledRegion`. Blocks of one kind share compiled code: the code is compiled for a function that takes
the block as an argument (`_run_block(block, *args)`), so its parameters are inputs of the compiled graph and
one artifact serves all 19 double blocks of FLUX, another all 38 single blocks.

Compilation is ahead-of-time (`torch.compile(...).aot_compile`, torch's precompile API): the artifact holds
dynamo's bytecode, Inductor's code and the Triton kernels, and is saved into the model's one compile cache
(compile_cache.py). A new process deserializes it (milliseconds) and runs it: no tracing, no Inductor, no
kernel compiles. Guards are kept only for what compiled code really depends on and what serializes (tensor
dtypes, devices and static sizes; the symbolic shape conditions); everything else an artifact depends on
(the block's class, parameter shapes, non-tensor attributes, attention processor) is in its key, so a guard
we drop is never one that could differ.

Dynamic shapes: an artifact is compiled with dynamic sizes, so one serves every resolution (image tokens,
latent height/width, text length) of its shape class. Torch specializes sizes 0 and 1, so batch 1 and batch
> 1 are two classes: a call whose inputs fail every artifact's guards compiles one more artifact for its class
(and it is saved). `Specialization.EAGER` compiles static-shape artifacts instead, one per shape.

Where ahead-of-time compilation is unavailable (older torch) or fails for a block (an op that does not
serialize), that block kind falls back to plain `torch.compile` (JIT), said in one line; its kernels still
persist through Inductor's caches (compile_cache.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .background_compile import BackgroundCompiler
from .base import Specialization
from .compile_cache import INDUCTOR_GROUP, NATIVE_GROUP, ArtifactStore
from .region_artifacts import deserialize, native_files, put_native, read_native, restore_native, serialize
from .region_keys import block_fingerprint, call_signature, canonical_inputs

logger = logging.getLogger(__name__)

# Block classes compiled as regions on request (`compile_resnets`), besides a model's own `_repeated_blocks`
# (diffusers' regional list): the UNets' resnets come in a dozen shapes, one artifact each.
RESNET_REGIONS = ("ResnetBlock2D",)
# Guard types kept in artifacts: what compiled code depends on and what serializes. The rest (module
# identity, attribute values, globals) is covered by the artifact key (`block_fingerprint`).
KEPT_GUARDS = frozenset({"TENSOR_MATCH", "SHAPE_ENV", "DEFAULT_DEVICE"})


def _run_block(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """What every region compiles: the block's own (class) forward on the block. The block is an argument;
    its instance `forward` is the CompiledForward hook that calls this, so the class forward is kept on the
    block as a plain function (nothing of the hook may be reachable from compiled code: it holds artifacts)."""
    return block._class_forward(block, *args, **kwargs)


def _keep_guards(entries: Sequence[Any]) -> list[bool]:
    return [entry.guard_type in KEPT_GUARDS for entry in entries]


def aot_available() -> tuple[bool, str]:
    """Whether this torch has the ahead-of-time compile API, and why not."""
    if not hasattr(torch.compiler, "load_compiled_function"):
        return False, f"torch {torch.__version__} has no torch.compiler.load_compiled_function"
    if not hasattr(torch._dynamo.config, "enable_aot_compile"):
        return False, f"torch {torch.__version__} has no torch._dynamo.config.enable_aot_compile"
    return True, "ok"


def configure_dynamo() -> None:
    """Process-wide settings compiled regions rely on."""
    cfg = torch._dynamo.config
    if hasattr(cfg, "enable_aot_compile"):
        cfg.enable_aot_compile = True  # off by default in torch 2.11
    # Python floats inside blocks (scales, eps) stay constants: a float turned into a graph input makes
    # aot_compile restart its analysis, which it cannot do.
    cfg.specialize_float = True
    cfg.recompile_limit = max(cfg.recompile_limit, 64)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 1024)


# ---- compiling and loading ------------------------------------------------------------------------------------
@dataclass
class RegionStats:
    """What compiling cost and what the cache gave, for logs and benchmarks."""

    compiled: dict[str, float] = field(default_factory=dict)  # artifact key -> seconds to compile
    loaded: int = 0  # artifacts deserialized from the cache
    background: int = 0  # artifacts compiled by the background compiler and swapped in
    load_s: float = 0.0
    jit_kinds: list[str] = field(default_factory=list)  # block kinds on the JIT fallback
    # artifact key -> seconds per compiler phase (dynamo's own timers, nested: for profiles, not sums)
    phases: dict[str, dict[str, float]] = field(default_factory=dict)


class RegionCompiler:
    """Compiles, stores and serves the artifacts of every region of one pipeline."""

    def __init__(
        self,
        store: ArtifactStore,
        *,
        specialization: Specialization = Specialization.NONE,
        options: dict[str, Any] | None = None,
        tag: str = "",
    ) -> None:
        self.store = store
        # block kinds compiled by `background` (background_compile.py) and eager until their artifacts land
        self.background: BackgroundCompiler | None = None
        self.deferred: frozenset[str] = frozenset()
        self.dynamic = specialization is not Specialization.EAGER
        self.options = dict(options or {})
        self.tag = tag  # what else artifacts depend on (attention backend, precision...)
        self.aot, why = aot_available()
        if not self.aot:
            logger.info("ahead-of-time compile unavailable (%s); regions use torch.compile", why)
        self.stats = RegionStats()
        self._loaded: dict[str, list[Callable[..., Any]]] = {}  # group -> artifacts, in store order
        self._jit: dict[str, Callable[..., Any]] = {}  # block kind -> torch.compile'd _run_block
        self._failed_kinds: set[str] = set()
        self._fingerprints: dict[int, str] = {}

    def preload(self) -> int:
        """Deserialize every artifact the cache holds (at load time, not in the first request)."""
        if not self.aot:
            return 0
        restore_native(self.store)
        for group in self.store.groups():
            if group not in (INDUCTOR_GROUP, NATIVE_GROUP):
                self._artifacts(group)
        return self.stats.loaded

    def group(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        mode = "dyn" if self.dynamic else "static"
        fingerprint = self._fingerprints.get(id(block))
        if fingerprint is None:  # once per block: its structure does not change while it is served
            fingerprint = self._fingerprints[id(block)] = block_fingerprint(block)
        parts = (type(block).__name__, fingerprint, call_signature(args, kwargs), mode, self.tag)
        return "-".join(p for p in parts if p)

    def __call__(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        kind = type(block).__name__
        # one memory layout per input: a view some blocks receive (FLUX's first single block gets slices of
        # the joint sequence) would otherwise fail the stride guards and cost an artifact of its own
        args, kwargs = canonical_inputs(args), canonical_inputs(kwargs)
        if not self.aot or kind in self._failed_kinds:
            return self._jit_call(kind, block, args, kwargs)
        group = self.group(block, args, kwargs)
        artifacts = self._artifacts(group)
        for fn in artifacts:
            if fn.guard_check(block, *args, **kwargs):
                return fn(block, *args, **kwargs)
        if artifacts and logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "no artifact of %s fits this call: %s",
                kind,
                _guard_failure(artifacts[-1], block, args, kwargs),
            )
        if kind in self.deferred:  # eager until the background compiler lands it (never compiled here)
            if self.background is not None:
                self.background.submit(group, block, args, kwargs)
            return block._class_forward(block, *args, **kwargs)
        fn = self._compile(group, kind, block, args, kwargs)
        if fn is None:
            return self._jit_call(kind, block, args, kwargs)
        return fn(block, *args, **kwargs)

    def swap_in(self) -> int:
        """Take what the background compiler finished into the store and serve it from now on; returns how
        many artifacts it was (the caller recaptures CUDA graphs that ran those regions eagerly)."""
        if self.background is None:
            return 0
        ready = self.background.take()
        for item in ready:
            loaded = self._artifacts(item.group)  # what the store held is loaded first: keys and list align
            held = len(self.store.keys(item.group))
            self.store.add(item.group, item.data)
            put_native(self.store, item.native)
            if len(self.store.keys(item.group)) > held:  # not a copy of one it holds (one serves both)
                loaded.append(item.fn)
        self.stats.background += len(ready)
        return len(ready)

    def _artifacts(self, group: str) -> list[Callable[..., Any]]:
        loaded = self._loaded.setdefault(group, [])
        keys = self.store.keys(group)
        if len(loaded) < len(keys):  # deserialize what the cache holds for this group, once
            start = time.perf_counter()
            for key in keys[len(loaded) :]:
                try:
                    loaded.append(deserialize(self.store.get(key)))
                    self.stats.loaded += 1
                except Exception as e:  # a stale or damaged artifact costs a compile, never the request
                    logger.warning("ignoring compiled artifact %s: %s", key, _short(e))
                    self.store.discard(key)
                    loaded.append(_NeverMatches())
            self.stats.load_s += time.perf_counter() - start
        return loaded

    def _compile(
        self, group: str, kind: str, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        start, phases = time.perf_counter(), _compile_phases()
        logger.info(
            "compiling %s ahead of time (%s shapes)...", kind, "dynamic" if self.dynamic else "static"
        )
        try:
            fn, data, native = aot_compile_region(
                block, args, kwargs, dynamic=self.dynamic, options=self.options
            )
            put_native(self.store, read_native(native))
        except Exception as e:
            logger.warning(
                "ahead-of-time compile of %s failed (%s); it uses torch.compile instead", kind, _short(e)
            )
            self._failed_kinds.add(kind)
            return None
        seconds = time.perf_counter() - start
        key = self.store.add(group, data)
        self._loaded.setdefault(group, []).append(fn)
        self.stats.compiled[key] = seconds
        self.stats.phases[key] = _phases_since(phases)
        logger.info("compiled %s in %.1f s (%.1f MB)", kind, seconds, len(data) / 1e6)
        return fn

    def _jit_call(self, kind: str, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        fn = self._jit.get(kind)
        if fn is None:
            fn = torch.compile(_run_block, fullgraph=True, dynamic=self.dynamic, options=self.options or None)
            self._jit[kind] = fn
            self.stats.jit_kinds.append(kind)
        return fn(block, *args, **kwargs)


def aot_compile_region(
    block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, dynamic: bool, options: dict[str, Any]
) -> tuple[Any, bytes, set[str]]:
    """Compile `_run_block` for `block` and inputs like these, ahead of time. Returns the compiled function,
    its serialized bytes and the CPU kernel libraries Inductor compiled for it (paths in its cache folder)."""
    compiled = torch.compile(
        _run_block, fullgraph=True, dynamic=dynamic, options={**options, "guard_filter_fn": _keep_guards}
    )
    # sizes that happen to be equal (a token count and a width) must not share one symbol
    before = native_files()
    with torch.fx.experimental._config.patch(use_duck_shape=False):
        fn = compiled.aot_compile(((block, *args), kwargs))
    return fn, serialize(fn), native_files() - before


def _compile_phases() -> dict[str, float]:
    """Seconds dynamo's timers (`dynamo_timed`) have counted per phase in this process so far."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:  # a private table: without it, profiles lack the breakdown, nothing else
        return {}
    return {name: sum(values) for name, values in compilation_time_metrics.items()}


def _phases_since(before: dict[str, float], least: float = 0.05) -> dict[str, float]:
    now = _compile_phases()
    spent = {name: now[name] - before.get(name, 0.0) for name in now}
    return {name: round(s, 3) for name, s in sorted(spent.items(), key=lambda kv: -kv[1]) if s >= least}


class _NeverMatches:
    """Stands in for an artifact that could not be loaded, so indices stay aligned with the store."""

    def guard_check(self, *args: Any, **kwargs: Any) -> bool:
        return False


def _guard_failure(fn: Any, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Why an artifact's guards refuse a call (torch internals, for debug logs only)."""
    try:
        f_locals = fn.prepare_f_locals(block, *args, **kwargs)
        return str(fn._artifacts.guard_manager.check_verbose(f_locals).verbose_code_parts)
    except Exception as e:
        return f"unknown ({_short(e)})"


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0][:300]


# ---- the regions of a module -----------------------------------------------------------------------------------
class CompiledForward:
    """A block's instance `forward`: runs the block through the compiler (eagerly while not `enabled`).

    Installed as an instance attribute, so the module tree, parameter names and tensors stay exactly as
    loaded (LoRA, state dicts and diffusers' own code see the same model).
    """

    def __init__(self, block: nn.Module, compiler: RegionCompiler) -> None:
        self.block = block
        self.compiler = compiler
        self.original = type(block).forward  # the class's forward function
        block._class_forward = self.original
        self.enabled = True

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledForward | None:
        # a deep copy of the block (being made: it is in `memo`) gets a hook of its own, same compiler
        block = memo.get(id(self.block))
        return None if block is None else CompiledForward(block, self.compiler)

    def __reduce__(self) -> tuple[Any, ...]:
        # Dynamo records the block's __dict__ (which holds this hook) in an artifact's guard state; the hook
        # holds the compiler and its artifacts, which must not be pickled into every new artifact.
        return (str, ("CompiledForward",))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled or torch.compiler.is_compiling():
            return self.original(self.block, *args, **kwargs)
        return self.compiler(self.block, args, kwargs)


def region_classes(module: nn.Module, extra: Sequence[str] = ()) -> tuple[str, ...]:
    return (*getattr(module, "_repeated_blocks", ()), *extra)


def wrap_regions(
    module: nn.Module, compiler: RegionCompiler, extra: Sequence[str] = ()
) -> list[CompiledForward]:
    """Route every block of `module` whose class is a region (its `_repeated_blocks`, and `extra`) through
    `compiler` (outermost blocks only)."""
    names = set(region_classes(module, extra))
    hooks: list[CompiledForward] = []

    def visit(parent: nn.Module) -> None:
        for child in parent.children():
            if type(child).__name__ in names:
                if not isinstance(child.__dict__.get("forward"), CompiledForward):
                    child.forward = CompiledForward(child, compiler)
                hooks.append(child.forward)
            else:
                visit(child)

    visit(module)
    return hooks
