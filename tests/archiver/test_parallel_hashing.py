"""Large files take the fast paths (sha256 and CRC-32 on threads of their own, stored weights written at
their offset) and the archives are the same bytes as the plain one-after-the-other path writes;
failures midway still leave the old archive alone, and no thread or open file behind."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import zipfile
import zlib
from pathlib import Path

import pytest

import archiver
from archiver import _fastcopy
from archiver.errors import InputFileError

FORMATS = ["default", "zip-store", "tgz", "no-archive"]
BIG = (9 << 20) + 12345  # past PARALLEL_HASH_BYTES, and not a whole number of chunks


def digest_of(path: Path) -> str:
    """sha256 of an archive file, or of a folder archive's files and their contents."""
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(path)).encode() + b"\0" + file.read_bytes())
    else:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def build_all(model_inputs, store: str) -> dict[str, str]:
    return {
        fmt: digest_of(
            archiver.build_archive(
                **model_inputs.build_kwargs(archive_format=fmt, export_path=f"{store}/{fmt}")
            )
        )
        for fmt in FORMATS
    }


def test_fast_paths_write_the_same_bytes_as_the_plain_path(model_inputs, epoch, monkeypatch, tmp_path):
    model_inputs.weights.write_bytes(os.urandom(BIG))
    calls = []
    real = os.pwrite

    def counting(*args):
        calls.append(real(*args))
        return calls[-1]

    monkeypatch.setattr(os, "pwrite", counting)
    monkeypatch.setattr(_fastcopy, "WRITEBACK_BYTES", 2 << 20)  # early writeback runs a few times too
    monkeypatch.setattr(_fastcopy, "BLOCK_BYTES", 1 << 20)  # more blocks than buffers: the ring is reused
    fast = build_all(model_inputs, str(tmp_path / "fast"))
    assert sum(calls) == 3 * BIG  # weights written at offsets: default, zip-store, no-archive
    monkeypatch.setattr(_fastcopy, "PARALLEL_HASH_BYTES", 1 << 40)  # hashed inline, written by zipfile
    plain = build_all(model_inputs, str(tmp_path / "plain"))
    assert fast == plain
    with zipfile.ZipFile(tmp_path / "fast" / "default" / "tiny.mar") as zf:
        assert zf.testzip() is None  # every CRC-32 right
        assert zf.read("weights.pt") == model_inputs.weights.read_bytes()
    with archiver.open_archive(tmp_path / "fast" / "default" / "tiny.mar") as reader:
        assert reader.verify().ok  # every sha256 right


def test_an_output_that_cannot_be_written_at_an_offset_is_left_to_the_plain_path(tmp_path):
    source = tmp_path / "weights.bin"
    source.write_bytes(os.urandom(BIG))
    read_end, write_end = os.pipe()
    try:
        assert _fastcopy.write_at(source, BIG, write_end, 0, crc=True, on_progress=None) is None
        os.set_blocking(read_end, False)
        with pytest.raises(BlockingIOError):
            os.read(read_end, 1)  # nothing was written
    finally:
        os.close(read_end)
        os.close(write_end)
    assert hash_threads() == []


def test_a_refused_offset_write_falls_back_to_zipfile(model_inputs, epoch, monkeypatch, tmp_path):
    model_inputs.weights.write_bytes(os.urandom(BIG))
    expected = digest_of(archiver.build_archive(**model_inputs.build_kwargs(export_path=str(tmp_path / "a"))))

    def refuse(*args):
        raise OSError(errno.ESPIPE, "Illegal seek")

    monkeypatch.setattr(os, "pwrite", refuse)
    assert digest_of(
        archiver.build_archive(**model_inputs.build_kwargs(export_path=str(tmp_path / "b")))
    ) == (expected)


@pytest.mark.parametrize("archive_format", ["default", "tgz"])
def test_a_big_input_that_shrinks_midway_is_refused(model_inputs, archive_format):
    old = archiver.build_archive(**model_inputs.build_kwargs(archive_format=archive_format))
    before = old.read_bytes()
    model_inputs.weights.write_bytes(os.urandom(BIG))

    def shrink(n: int) -> None:
        with open(model_inputs.weights, "r+b") as fh:
            fh.truncate(1 << 20)

    with pytest.raises(InputFileError, match=r"weights\.pt changed while it was being archived"):
        archiver.build_archive(
            **model_inputs.build_kwargs(archive_format=archive_format, force=True), on_progress=shrink
        )
    assert old.read_bytes() == before
    assert sorted(p.name for p in old.parent.iterdir()) == [old.name]


def test_a_write_failing_midway_keeps_the_old_archive(model_inputs, monkeypatch):
    old = archiver.build_archive(**model_inputs.build_kwargs())
    before = old.read_bytes()
    model_inputs.weights.write_bytes(os.urandom(BIG))
    real = os.pwrite
    written = []

    def disk_full_after_two_blocks(*args):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(real(*args))
        return written[-1]

    monkeypatch.setattr(os, "pwrite", disk_full_after_two_blocks)
    monkeypatch.setattr(_fastcopy, "BLOCK_BYTES", 1 << 20)
    with pytest.raises(OSError, match="No space left"):
        archiver.build_archive(**model_inputs.build_kwargs(force=True))
    assert old.read_bytes() == before
    assert sorted(p.name for p in old.parent.iterdir()) == [old.name]


def hash_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("sha256", "crc32"))]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("crc", [True, False])
@pytest.mark.parametrize("size", [BIG, 8 << 20])  # a last partial block, and whole blocks only
def test_the_offset_write_hashes_what_it_writes(tmp_path, monkeypatch, crc, size):
    monkeypatch.setattr(_fastcopy, "BLOCK_BYTES", 1 << 20)  # 8 or 10 blocks through a ring of 4 buffers
    data = os.urandom(size)
    source = tmp_path / "weights.bin"
    source.write_bytes(data)
    progress = []
    with open(tmp_path / "out", "wb") as out:
        out.write(b"header")  # the copy lands at the given offset, after what is already there
        out.flush()
        record, crc32 = _fastcopy.write_at(
            source, size, out.fileno(), 6, crc=crc, on_progress=progress.append
        )
    assert (tmp_path / "out").read_bytes() == b"header" + data
    assert record.sha256 == hashlib.sha256(data).hexdigest() and record.size == size
    assert crc32 == (zlib.crc32(data) if crc else None)
    assert sum(progress) == size and len(progress) == -(-size // (1 << 20))
    assert hash_threads() == []


def test_the_written_copy_hashes_what_it_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(_fastcopy, "BLOCK_BYTES", 1 << 20)
    data = os.urandom(BIG)
    source = tmp_path / "weights.bin"
    source.write_bytes(data)
    written = bytearray()
    record = _fastcopy.copy_hashing(source, BIG, written.extend, None)
    assert bytes(written) == data
    assert record.sha256 == hashlib.sha256(data).hexdigest()
    assert hash_threads() == []


@pytest.mark.parametrize("archive_format", FORMATS)
def test_a_failure_midway_leaves_no_thread_or_open_file_behind(model_inputs, archive_format, monkeypatch):
    monkeypatch.setattr(_fastcopy, "BLOCK_BYTES", 1 << 20)
    model_inputs.weights.write_bytes(os.urandom(BIG))
    fds = open_fds()
    seen = []

    def fail_on_third_block(n: int) -> None:
        if n == 1 << 20:  # a block of the weights (the small files come in one piece)
            seen.append(hash_threads())
        if len(seen) == 3:
            raise RuntimeError("interrupted by the progress bar")

    with pytest.raises(RuntimeError, match="interrupted"):
        archiver.build_archive(
            **model_inputs.build_kwargs(archive_format=archive_format), on_progress=fail_on_third_block
        )
    assert any(name.startswith("sha256") for name in seen[-1])  # the threaded path really ran
    assert hash_threads() == []
    assert open_fds() == fds
    store = model_inputs.root / "model-store"
    assert list(store.iterdir()) == []  # no partial archive or temp file left


def test_a_growing_input_is_refused_on_the_offset_write_path(model_inputs):
    model_inputs.weights.write_bytes(os.urandom(BIG))

    def grow(n: int) -> None:
        with open(model_inputs.weights, "ab") as fh:
            fh.write(b"x" * 4096)

    with pytest.raises(InputFileError, match=r"weights\.pt changed while it was being archived"):
        archiver.build_archive(**model_inputs.build_kwargs(archive_format="zip-store"), on_progress=grow)
    assert hash_threads() == []
