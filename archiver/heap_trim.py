"""Keep a long-running server's memory flat: give freed heap pages back to the OS now and then (glibc).

glibc keeps freed memory in its heaps for reuse, and raises its mmap threshold each time a large block
is freed, after which request bodies, decoded images and batch tensors of a few MiB come from the heap.
The server's RSS then climbs toward the high-water mark of every mix of requests it has met, with free
holes in between (benchmarks/soak.py measured +10.5% over 10,000 mixed requests after a 10,000-request
warm-up). Pinning the mmap threshold cures that but costs 35-45% of ResNet34's throughput (a fresh
mapping and page faults for every large tensor); ``malloc_trim`` every few seconds returns the holes at
the cost of a heap walk, off the request path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Callable

TRIM_INTERVAL_S = 5.0


def _malloc_trim() -> Callable[[], object] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl or another libc without malloc_trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


class HeapTrimmer:
    """A daemon thread that calls ``malloc_trim(0)`` every ``interval_s`` until stopped; a no-op
    where the C library has no ``malloc_trim``."""

    def __init__(self, interval_s: float = TRIM_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._trim = _malloc_trim()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self._trim is not None

    def start(self) -> HeapTrimmer:
        if self._trim is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="heap-trimmer", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval_s + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._trim()
