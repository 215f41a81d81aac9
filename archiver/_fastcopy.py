"""Copy a file's bytes while computing its sha256 (and CRC-32), with the hashing on threads of their own.

Each block of the file is read once into one of a few reusable buffers (no new ``bytes`` per block,
which costs page faults on fresh memory); the sha256 thread and the CRC-32 thread each read that same
buffer while the caller writes it (``pwrite`` at an offset of the archive, for stored weights).
hashlib, zlib.crc32 and the write all release the GIL on large buffers, so on two cores the three
overlap: sha256 (about 0.5 s/GiB with SHA-NI) is the longest chain, and archiving costs little more
than copying. A buffer is refilled only once both threads are done with it.

Small files are hashed inline: a thread hand-off would cost more than it saves.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import hashlib
import os
import sys
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from archiver.errors import InputFileError
from archiver.manifest import FileRecord

Progress = Callable[[int], None]
# Small blocks keep the ring (4 MiB in all) in the CPU's cache while the threads read it and the main
# thread writes it, and memory flat: measured here, pwrite from a 1 MiB buffer costs about 0.2 s of CPU
# per GiB, several times less than from 16 MiB buffers, which go through main memory.
BLOCK_BYTES = 1 << 20  # one read, one hand-off to the hashing threads
SLOTS = 4  # buffers in the ring: the reader may run this many blocks ahead of the slower hash
# Below this a file is hashed inline and written through the usual file objects (no threads).
PARALLEL_HASH_BYTES = 4 << 20
WRITEBACK_BYTES = 32 << 20  # how much the kernel is handed at a time for writing back to disk
# pwrite refused for these reasons (a pipe or socket, a file opened for appending): write instead.
_NO_PWRITE = {errno.ESPIPE, errno.EINVAL, errno.EBADF, errno.EOPNOTSUPP, errno.ENOSYS}


class Digests:
    """sha256 (and optionally CRC-32) of blocks fed in file order, over a ring of reusable buffers.

    ``buffer()`` returns the next free buffer (waiting until both threads have finished with it);
    ``update(view)`` hands a filled part of it (or any bytes) to the threads, or hashes inline for a
    file below PARALLEL_HASH_BYTES. ``close()`` waits for work in flight and stops the threads; it is
    safe to call twice and after an error (never leaves a thread behind).
    """

    def __init__(self, expected_size: int, *, crc: bool = False) -> None:
        self._sha = hashlib.sha256()
        self._crc: int | None = 0 if crc else None
        parallel = expected_size >= PARALLEL_HASH_BYTES
        self._pools: list[ThreadPoolExecutor] = []
        if parallel:
            self._pools.append(ThreadPoolExecutor(1, "sha256"))
            if crc:
                self._pools.append(ThreadPoolExecutor(1, "crc32"))
        size = max(min(BLOCK_BYTES, expected_size), 1 << 16)
        slots = min(SLOTS, -(-expected_size // size) + 1) if parallel else 1
        self._buffers = [memoryview(bytearray(size)) for _ in range(slots)]
        self._pending: list[list[Future]] = [[] for _ in range(slots)]
        self._turn = 0

    def buffer(self) -> memoryview:
        slot = self._turn % len(self._buffers)
        self._wait(slot)
        return self._buffers[slot]

    def update(self, data: memoryview | bytes) -> None:
        slot = self._turn % len(self._buffers)
        self._wait(slot)
        self._turn += 1
        if not self._pools:
            self._sha.update(data)
            if self._crc is not None:
                self._crc = zlib.crc32(data, self._crc)
            return
        self._pending[slot] = [self._pools[0].submit(self._sha.update, data)]
        if self._crc is not None:
            self._pending[slot].append(self._pools[1].submit(self._add_crc, data))

    def sha256(self) -> str:
        self._wait_all()
        return self._sha.hexdigest()

    def crc32(self) -> int:
        self._wait_all()
        if self._crc is None:
            raise ValueError("this Digests was made without crc=True")
        return self._crc

    def close(self) -> None:
        """Let blocks in flight finish (each takes milliseconds), drop them, and stop the threads."""
        concurrent.futures.wait([f for futures in self._pending for f in futures])
        self._pending = [[] for _ in self._pending]
        for pool in self._pools:
            pool.shutdown(wait=True)
        self._pools = []

    def _add_crc(self, data: memoryview | bytes) -> None:
        self._crc = zlib.crc32(data, self._crc)  # only ever run by the single CRC thread, in order

    def _wait(self, slot: int) -> None:
        futures, self._pending[slot] = self._pending[slot], []
        for future in futures:
            future.result()

    def _wait_all(self) -> None:
        for slot in range(len(self._pending)):
            self._wait(slot)


def changed(source: Path, expected: int, size: int) -> InputFileError:
    now = f"more than {expected}" if size > expected else str(size)
    return InputFileError(f"{source} changed while it was being archived ({expected} → {now} bytes)")


def copy_hashing(
    source: Path, expected: int, write: Callable[[memoryview], object], on_progress: Progress | None
) -> FileRecord:
    """Read ``source`` once, pass every block to ``write`` and return its sha256 and size."""
    digests = Digests(expected)
    size = 0
    try:
        with open(source, "rb", buffering=0) as fh:
            while True:
                buffer = digests.buffer()[: expected + 1 - size]  # one byte past: did it grow?
                count = fh.readinto(buffer)
                if not count or size + count > expected:
                    break
                block = buffer[:count]
                digests.update(block)
                write(block)
                size += count
                if on_progress is not None:
                    on_progress(count)
        if size != expected or count:
            raise changed(source, expected, size + count)
        return FileRecord(sha256=digests.sha256(), size=size)
    finally:
        digests.close()


def write_at(
    source: Path, expected: int, dst: int, start: int, *, crc: bool, on_progress: Progress | None
) -> tuple[FileRecord, int | None] | None:
    """Copy ``source`` to byte ``start`` of the file open as ``dst`` (``pwrite``), hashing as it goes.

    Returns the record and (when ``crc``) the CRC-32, or None, having written nothing, where this
    cannot be done (a small file, an output that cannot be written at an offset): write it instead.
    Each block is written from the same buffer the hashing threads read, so the hashes are those of
    the bytes written. Measured here, ``pwrite`` from a 1 MiB buffer still in the CPU's cache costs less
    than having the kernel copy the range (``copy_file_range``, 0.3 against 0.4 s of CPU per GiB with
    the read), and the kernel copy would read every byte a second time.
    """
    if expected < PARALLEL_HASH_BYTES:
        return None
    digests = Digests(expected, crc=crc)
    writeback = _start_writeback()
    size = flushed = 0
    try:
        with open(source, "rb", buffering=0) as fh:
            src = fh.fileno()
            while True:
                buffer = digests.buffer()[: expected + 1 - size]  # one byte past: did it grow?
                count = os.preadv(src, [buffer], size)
                if not count or size + count > expected:
                    break
                block = buffer[:count]
                digests.update(block)
                try:
                    _write_block(dst, block, start + size)
                except OSError as exc:
                    if size == 0 and exc.errno in _NO_PWRITE:
                        return None
                    raise
                size += count
                if size - flushed >= WRITEBACK_BYTES:
                    writeback(dst, start + flushed, size - flushed)
                    flushed = size
                if on_progress is not None:
                    on_progress(count)
        if size != expected or count:
            raise changed(source, expected, size + count)
        return FileRecord(sha256=digests.sha256(), size=size), digests.crc32() if crc else None
    finally:
        digests.close()


def _write_block(dst: int, block: memoryview, offset: int) -> None:
    while block:
        done = os.pwrite(dst, block, offset)
        block, offset = block[done:], offset + done


def _start_writeback() -> Callable[[int, int, int], None]:
    """A function that asks the kernel to start writing a byte range of a file to disk, not waiting for
    it (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so the disk works while we hash and the
    final fsync has little left to wait for; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return lambda fd, offset, count: None
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return lambda fd, offset, count: None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    write_flag = 2  # SYNC_FILE_RANGE_WRITE

    def start(fd: int, offset: int, count: int) -> None:
        call(fd, offset, count, write_flag)  # a failure only means the final fsync does all the work

    return start
