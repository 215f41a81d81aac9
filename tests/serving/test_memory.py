"""The server's heap trimmer: runs beside the server, gives freed heap pages back, stops when asked."""

import sys

import pytest

from archiver.heap_trim import HeapTrimmer


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_the_trimmer_returns_freed_heap_pages_and_stops_when_asked():
    # Many mid-sized blocks come from the heap; freeing all but the last leaves holes glibc keeps.
    blocks = [bytearray(64 * 1024) for _ in range(4000)]  # about 256 MiB, touched
    keep = blocks[-1]
    del blocks
    before = _rss_kb()

    trimmer = HeapTrimmer(interval_s=0.01).start()
    assert trimmer.available
    try:
        deadline = 200
        while _rss_kb() > before - 100 * 1024 and deadline:
            trimmer._stop.wait(0.02)
            deadline -= 1
    finally:
        trimmer.stop()

    assert _rss_kb() < before - 100 * 1024, "freed heap memory was not returned"
    assert trimmer._thread is not None and not trimmer._thread.is_alive()
    assert len(keep) == 64 * 1024
