"""Measuring what training and inference cost: FLOPs, peak memory, time.

FLOPs are counted by :mod:`torch.utils.flop_counter` (what actually ran, not a formula);
peak memory is ``torch.cuda.max_memory_allocated`` on a GPU and the process's resident set
size sampled by a background thread on a CPU (there is no CPU allocator counter to reset).
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so a following
    RSS measurement starts from what is really in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block of code above the memory in use when it started.

    Use as a context manager; afterwards :attr:`peak_bytes` is the peak *increase* and
    :attr:`baseline_bytes` what was in use before (RSS on CPU, allocated bytes on CUDA).
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.001):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._max = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, current_rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
        else:
            release_free_memory()
            self.baseline_bytes = self._max = current_rss_bytes()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.baseline_bytes
        else:
            self._max = max(self._max, current_rss_bytes())
            self._stop.set()
            self._thread.join()
            self.peak_bytes = self._max - self.baseline_bytes


@contextmanager
def count_flops():
    """Count FLOPs of the enclosed torch ops; yields an object whose ``.total`` is set on exit."""

    @dataclass
    class Result:
        total: int = 0

    result = Result()
    counter = FlopCounterMode(display=False)
    with counter:
        yield result
    result.total = int(counter.get_total_flops())


class SavedActivations:
    """Bytes autograd keeps for backward inside the block (a deterministic memory figure).

    Tensors that share storage with ``exclude`` (the model's weights, which backward also
    references but which are not extra memory) are not counted.
    """

    def __init__(self, exclude=()) -> None:
        self.bytes = 0
        self._seen: set[int] = {p.untyped_storage().data_ptr() for p in exclude}

    def _pack(self, t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    @contextmanager
    def track(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


def timed(fn, *, device: torch.device | str = "cpu") -> float:
    """Wall-clock seconds of ``fn()`` (synchronising CUDA around it)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - start
