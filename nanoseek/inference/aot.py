"""Decode steps compiled ahead of time with AOTInductor (torch.export + inductor), called without Dynamo.

torch.compile checks its guards and rebuilds the graph's argument list (every parameter) on each
call, about a third of a batch-1 step on the `tiny` config. An exported step is a C++ function:
a call is one trip into C++, and the runner itself checks that inputs fit the shapes it was
compiled for. The same inductor kernels run either way. The artifact is built without the weights
and handed the model's own tensors (user-managed constants): no copy of the model per artifact,
and a step sees in-place weight updates (a training loop generating with its current policy).

One artifact per step function, model, sampling flags and batch size, with the batch padded up to
a power of two (capped at the engine's slots): a server's batch sizes come and go, and each new
artifact costs seconds to build. With the batch known, small matmuls become fused kernels (see
decode.AOT_MOST_ROWS_DECOMPOSED), which made batch 8 twice as fast as one artifact with a symbolic
batch. Padding rows copy row 0's inputs and run in free cache slots (slots past the batch are
never read before a prefill or a decode writes them), and their outputs are dropped. The attended
length is symbolic; it reaches the graph as the length of a dummy `span` tensor, since an
exported program takes tensors, not integers.

Built artifacts are also kept on disk, in $NANOSEEK_CACHE/aot (default ~/.cache/nanoseek/aot;
NANOSEEK_CACHE=off keeps nothing), under a hash of everything that shapes the compiled code: the
step, the model's config and dtypes, the sampling flags, the batch, the buffers' shapes, the
inductor options, torch's version, the CPU's instruction set and nanoseek's own source. A second
`serve --compile` of the same model starts in seconds instead of minutes. Weights never go there.
The folder is bounded: after each write the least recently used artifacts (a load counts as a
use) go until it holds at most $NANOSEEK_CACHE_MB megabytes (default 1024; ~3 MB an artifact on
`tiny`), since every change of model, torch or nanoseek's source makes new ones.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import warnings
import weakref
from pathlib import Path

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .sampling import SamplingBatch

_ARTIFACTS: dict = {}
_BUILDS = itertools.count()
_DIR: str | None = None


class _Step(nn.Module):
    """fn(model, *buffers, *per_row, SamplingBatch, attend) as a module of tensors only, for export."""

    def __init__(self, fn, model: nn.Module, flags: tuple[bool, bool, bool]):
        super().__init__()
        self.fn, self.model, self.flags = fn, model, flags

    def forward(self, span, *args):
        *head, temperature, top_k, top_p, min_p, penalty, seed = args
        s = SamplingBatch(temperature, top_k, top_p, min_p, penalty, seed, *self.flags)
        return self.fn(self.model, *head, s, span.shape[0])


def _directory() -> str:
    global _DIR
    if _DIR is None:
        _DIR = tempfile.mkdtemp(prefix="nanoseek-aot-")
        atexit.register(shutil.rmtree, _DIR, ignore_errors=True)
    return _DIR


DEFAULT_CACHE_MB = 1024


def cache_budget_bytes() -> int:
    """Bytes the disk cache may hold ($NANOSEEK_CACHE_MB megabytes; a bad value is an error, not ignored)."""
    raw = os.environ.get("NANOSEEK_CACHE_MB", "").strip()
    try:
        megabytes = float(raw) if raw else DEFAULT_CACHE_MB
    except ValueError:
        raise ValueError(f"NANOSEEK_CACHE_MB must be a number of megabytes, got {raw!r}") from None
    # NaN passed `< 0`, and int() of it (or of inf) then failed every ahead-of-time build, which fell
    # back to torch.compile with a warning about converting a float; "inf" means no limit
    if not megabytes >= 0:
        raise ValueError(f"NANOSEEK_CACHE_MB must be 0 or more, got {raw!r}")
    return sys.maxsize if megabytes == float("inf") else int(megabytes * 2**20)


def prune_cache(folder: Path, keep: Path, budget: int) -> list[Path]:
    """Delete the least recently used artifacts in folder until it holds at most `budget` bytes,
    never `keep` (the one just written). Returns what was deleted. Another process may be pruning
    or loading at the same time: a file already gone is skipped, and one deleted under a reader
    only costs that reader a rebuild (an unreadable artifact is rebuilt, see _load_or_compile)."""
    entries = []
    for path in folder.glob("*.pt2"):
        try:
            stat = path.stat()
        except OSError:
            continue
        entries.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    deleted = []
    for _, size, path in sorted(entries):  # oldest use first
        if total <= budget:
            break
        if path == keep:
            continue
        try:
            path.unlink()
        except OSError:
            continue
        total -= size
        deleted.append(path)
    return deleted


def cache_dir() -> Path | None:
    """Where artifacts are kept across processes, or None when NANOSEEK_CACHE is "off"."""
    root = os.environ.get("NANOSEEK_CACHE", "").strip()
    if root.lower() in ("off", "0", "none"):
        return None
    return Path(root or Path.home() / ".cache" / "nanoseek").expanduser() / "aot"


_SOURCE_DIGEST: str | None = None


def _source_digest() -> str:
    """A hash of nanoseek's Python source: a changed model or step must never load an old artifact."""
    global _SOURCE_DIGEST
    if _SOURCE_DIGEST is None:
        h = hashlib.sha256()
        for path in sorted(Path(__file__).resolve().parents[1].rglob("*.py")):
            h.update(path.as_posix().encode() + b"\0" + path.read_bytes())
        _SOURCE_DIGEST = h.hexdigest()
    return _SOURCE_DIGEST


def _cache_key(fn, model: nn.Module, flags, padded: int, args: tuple, options: dict) -> str:
    described = {
        "step": f"{fn.__module__}.{fn.__qualname__}", "config": model.config.to_dict(),
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}), "flags": flags, "batch": padded,
        "args": [(list(t.shape), str(t.dtype)) for t in args[1:]],  # not the span: its length is symbolic
        "options": options, "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
        "source": _source_digest(),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=repr).encode()).hexdigest()[:32]


def padded_batch(B: int, slots: int) -> int:
    """The batch size an artifact is compiled for: the next power of two, at most the slots."""
    return min(1 << (B - 1).bit_length(), slots)


def aot_call(fn, model: nn.Module, buffers: tuple, per_row: tuple, s: SamplingBatch, attend: int, options):
    """fn(model, *buffers, *per_row, s, attend) through its AOTInductor artifact (compiled on first use).

    buffers are whole engine buffers (fixed shapes, mutated in place; dimension 1 of the first is
    the slots); per_row tensors have the batch as their first dimension, as have the outputs.
    options(batch, dtype) gives the inductor options of an artifact for that batch size and the model's dtype.
    """
    B = per_row[0].shape[0]
    padded = padded_batch(B, buffers[0].shape[1])
    flags = (s.all_greedy, s.any_filter, s.any_penalty)
    shapes = tuple((tuple(t.shape), t.dtype) for t in buffers)
    key = (fn, weakref.ref(model, _forget), flags, padded, shapes)
    rows = tuple(_pad(t, padded) for t in (*per_row, *s[:6]))
    span = torch.empty(attend, dtype=torch.int8, device=per_row[0].device)
    args = (span, *buffers, *rows)
    runner = _ARTIFACTS.get(key)
    if runner is None:
        runner = _ARTIFACTS[key] = _load_or_compile(fn, model, flags, padded, args, options(padded, model.dtype))
    out = runner(*args)  # the step's own output structure: a tensor or a tuple of them
    if padded == B:
        return out
    return out[:B] if isinstance(out, torch.Tensor) else tuple(t[:B] for t in out)


def _forget(dead: weakref.ref) -> None:
    """A model was freed: drop its artifacts, which hold its tensors (they would outlive it)."""
    for key in [k for k in _ARTIFACTS if k[1] is dead]:
        del _ARTIFACTS[key]


def _pad(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t with row 0 repeated at the end up to `rows` rows."""
    if t.shape[0] == rows:
        return t
    return torch.cat((t, t[:1].expand(rows - t.shape[0], *t.shape[1:])))


def _load_or_compile(fn, model, flags, padded, args, options):
    """The artifact from the disk cache, or built now (and then kept there); bound to model's tensors."""
    step = _Step(fn, model, flags)
    folder = cache_dir()
    cached = folder / f"{fn.__name__}-{_cache_key(fn, model, flags, padded, args, options)}.pt2" if folder else None
    tensors = {**dict(step.named_parameters()), **dict(step.named_buffers())}
    runner = None
    if cached is not None and cached.is_file():
        try:
            runner = _Runner(torch._inductor.aoti_load_package(str(cached)))
            os.utime(cached)  # a use: pruning removes the least recently used first
        except Exception as e:  # a damaged file (or one pruned by another process): build it again
            warnings.warn(f"{cached}: unreadable compiled step ({type(e).__name__}: {e}); rebuilding it")
    if runner is None:
        runner, lifted = _compile(step, tensors, args, options, cached)
        tensors = {**tensors, **lifted}
    # the artifact holds no weights: it reads the model's own tensors, not a copy taken at build time
    runner.load_constants({name: tensors[name] for name in runner.get_constant_fqns()},
                          check_full_update=True, user_managed=True)
    return runner


def _compile(step: _Step, module_tensors: dict, args, options, cached: Path | None) -> tuple:
    """(runner, the tensors it needs that are not the model's: constants that export lifted out of the code)."""
    budget = cache_budget_bytes() if cached is not None else 0  # a bad setting fails before the build, not after
    max_len = args[1].shape[2]  # of the cache, (layers, slots, max_len, R)
    S = torch.export.Dim("attend", min=2, max=max_len - 1)
    dynamic = ({0: S}, (None,) * (len(args) - 1))  # (span, *args): everything but the attended length static
    path = f"{_directory()}/{step.fn.__name__}-{next(_BUILDS)}.pt2"  # never a loaded artifact's file
    with warnings.catch_warnings():  # torch's own pytree deprecation notice, nothing we can act on
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        exported = torch.export.export(step, args, dynamic_shapes=dynamic, strict=False)
        options = {**options, "aot_inductor.package_constants_in_so": False}
        package = torch._inductor.aoti_compile_and_package(exported, package_path=path, inductor_configs=options)
    lifted = {k: v for k, v in exported.constants.items() if k not in module_tensors}
    if cached is not None and not lifted:  # a cached artifact can only be given the model's tensors
        try:  # written under a temporary name, then renamed: a reader never sees half a file
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
            shutil.copyfile(package, partial)
            os.replace(partial, cached)
            prune_cache(cached.parent, cached, budget)
        except OSError as e:  # a read-only home still serves, just without the cache
            warnings.warn(f"could not keep the compiled step in {cached.parent}: {e}")
    return _Runner(torch._inductor.aoti_load_package(package)), lifted


class _Runner:
    """A loaded artifact, called through its loader directly: the package's own __call__ flattens
    the arguments and reads its call spec on every call, ~20 us of a ~450 us batch-1 step on `tiny`."""

    def __init__(self, compiled):
        self.loader = compiled.loader
        self.out_spec = pytree.treespec_loads(self.loader.get_call_spec()[1])
        self.get_constant_fqns = compiled.get_constant_fqns
        self.load_constants = compiled.load_constants

    def __call__(self, *tensors: torch.Tensor):
        return pytree.tree_unflatten(self.loader.boxed_run(list(tensors)), self.out_spec)
