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
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import warnings
import weakref

import torch
from torch import nn

from .sampling import SamplingBatch

_ARTIFACTS: dict = {}
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


def padded_batch(B: int, slots: int) -> int:
    """The batch size an artifact is compiled for: the next power of two, at most the slots."""
    return min(1 << (B - 1).bit_length(), slots)


def aot_call(fn, model: nn.Module, buffers: tuple, per_row: tuple, s: SamplingBatch, attend: int, options):
    """fn(model, *buffers, *per_row, s, attend) through its AOTInductor artifact (compiled on first use).

    buffers are whole engine buffers (fixed shapes, mutated in place; dimension 1 of the first is
    the slots); per_row tensors have the batch as their first dimension, as have the outputs.
    options(batch) gives the inductor options of an artifact for that batch size.
    """
    B = per_row[0].shape[0]
    padded = padded_batch(B, buffers[0].shape[1])
    flags = (s.all_greedy, s.any_filter, s.any_penalty)
    shapes = tuple((tuple(t.shape), t.dtype) for t in buffers)
    key = (fn, weakref.ref(model), flags, padded, shapes)
    rows = tuple(_pad(t, padded) for t in (*per_row, *s[:6]))
    span = torch.empty(attend, dtype=torch.int8, device=per_row[0].device)
    args = (span, *buffers, *rows)
    runner = _ARTIFACTS.get(key)
    if runner is None:
        runner = _ARTIFACTS[key] = _compile(fn, model, flags, args, options(padded))
    out = runner(*args)  # the step's own output structure: a tensor or a tuple of them
    if padded == B:
        return out
    return out[:B] if isinstance(out, torch.Tensor) else tuple(t[:B] for t in out)


def _pad(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t with row 0 repeated at the end up to `rows` rows."""
    if t.shape[0] == rows:
        return t
    return torch.cat((t, t[:1].expand(rows - t.shape[0], *t.shape[1:])))


def _compile(fn, model, flags, args, options):
    max_len = args[1].shape[2]  # of the cache, (layers, slots, max_len, R)
    S = torch.export.Dim("attend", min=2, max=max_len - 1)
    dynamic = ({0: S}, (None,) * (len(args) - 1))  # (span, *args): everything but the attended length static
    path = f"{_directory()}/{fn.__name__}-{len(_ARTIFACTS)}.pt2"
    with warnings.catch_warnings():  # torch's own pytree deprecation notice, nothing we can act on
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        exported = torch.export.export(_Step(fn, model, flags), args, dynamic_shapes=dynamic, strict=False)
        options = {**options, "aot_inductor.package_constants_in_so": False}
        package = torch._inductor.aoti_compile_and_package(exported, package_path=path, inductor_configs=options)
        runner = torch._inductor.aoti_load_package(package)
    # the artifact holds no weights: it reads the model's own tensors, not a copy taken at build time
    constants = {**exported.state_dict, **exported.constants}
    runner.load_constants({name: constants[name] for name in runner.get_constant_fqns()},
                          check_full_update=True, user_managed=True)
    return runner
