"""Decode steps compiled ahead of time with AOTInductor (torch.export + inductor), called without Dynamo.

torch.compile checks its guards and rebuilds the graph's argument list (every parameter) on each
call, about a third of a batch-1 step on the `tiny` config. An exported step is a C++ function
with the weights baked in: a call is one trip into C++, and the runner itself checks that inputs
fit the shapes it was compiled for. The same inductor kernels run either way.

One artifact per step function, model, sampling flags and batch regime: batch 1 is compiled with
every shape known (so its single-row matmuls become fused kernels, see decode.COMPILE_OPTIONS);
larger batches share one artifact with a symbolic batch size. The attended length is symbolic
everywhere; it reaches the graph as the length of a dummy `span` tensor, since an exported program
takes tensors, not integers.
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


def aot_call(fn, model: nn.Module, buffers: tuple, per_row: tuple, s: SamplingBatch, attend: int, options: dict):
    """fn(model, *buffers, *per_row, s, attend) through its AOTInductor artifact (compiled on first use).

    buffers are whole engine buffers (fixed shapes, mutated in place); per_row tensors have the
    batch as their first dimension.
    """
    B = per_row[0].shape[0]
    flags = (s.all_greedy, s.any_filter, s.any_penalty)
    shapes = tuple((tuple(t.shape), t.dtype) for t in buffers)
    key = (fn, weakref.ref(model), flags, B == 1, shapes)
    runner = _ARTIFACTS.get(key)
    sampling = tuple(s[:6])
    span = torch.empty(attend, dtype=torch.int8, device=per_row[0].device)
    args = (span, *buffers, *per_row, *sampling)
    if runner is None:
        runner = _ARTIFACTS[key] = _compile(fn, model, flags, buffers, per_row, sampling, span, B, options)
    return runner(*args)


def _compile(fn, model, flags, buffers, per_row, sampling, span, B, options):
    max_len = buffers[0].shape[2]
    S = torch.export.Dim("attend", min=2, max=max_len - 1)
    batch = None if B == 1 else {0: torch.export.Dim("batch", min=2, max=buffers[0].shape[1])}
    dynamic = ({0: S}, (*([None] * len(buffers)), *([batch] * (len(per_row) + len(sampling)))))  # (span, *args)
    args = (span, *buffers, *per_row, *sampling)
    path = f"{_directory()}/{fn.__name__}-{len(_ARTIFACTS)}.pt2"
    with warnings.catch_warnings():  # torch's own pytree deprecation notice, nothing we can act on
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        exported = torch.export.export(_Step(fn, model, flags), args, dynamic_shapes=dynamic, strict=False)
        package = torch._inductor.aoti_compile_and_package(exported, package_path=path, inductor_configs=options)
        return torch._inductor.aoti_load_package(package)
