"""Process-wide settings applied by the CLI and the benchmarks: the device to run on, and the CPU
allocator tuning that makes PyTorch faster on CPU (`nanoseek.tune_allocator()` for scripts of
one's own; importing nanoseek does not apply it, since it changes malloc for the whole process).

glibc serves large allocations (activations, logits) with fresh mmap'ed pages and returns them to
the OS on free, so every forward pass page-faults its big tensors in again: a (4096, 4096) fp32
logits matmul spends a third of its time there. Raising glibc's mmap and trim thresholds keeps
freed memory in the heap for reuse, as jemalloc or tcmalloc would without a preload. We call
mallopt directly because Python's standard library has no binding for it.
"""

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 1 << 30
_applied = False


def tune_allocator() -> bool:
    """Keep freed large blocks for reuse (glibc only); True when applied. Safe to call twice."""
    global _applied
    if _applied or not sys.platform.startswith("linux"):
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
    return _applied


class DeviceError(ValueError):
    """A --device (or --threads) this machine cannot run with."""


def set_threads(threads: int) -> None:
    """A --threads value: torch's CPU threads, 0 leaving torch's default; DeviceError below 0 (torch
    itself raises a bare RuntimeError there)."""
    import torch

    if threads < 0:
        raise DeviceError(f"--threads must be at least 0 (0: torch's default), got {threads}")
    if threads:
        torch.set_num_threads(threads)


def pick_device(name: str = "auto"):
    """A --device value -> torch.device. 'auto' is the first CUDA GPU when there is one, else the CPU;
    an explicit device that this machine lacks is an error naming it, not a silent CPU run."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"--device {name!r}: not a device name (cpu, cuda, cuda:N, auto)") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: this machine has no CUDA GPU that PyTorch can use")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    elif device.type != "cpu":
        raise DeviceError(f"--device {name}: only cpu and cuda are supported")
    return device
