"""Write a planned archive's bytes as a zip, a tar.gz or a folder, streaming and hashing every file once.

Output is reproducible: entries in sorted order, fixed permissions (0644 files, 0755 folders), owner 0,
and every timestamp from SOURCE_DATE_EPOCH when it is set. The manifest is written last, because it
carries the hashes of everything before it.

A large file's sha256 (and, for a zip, CRC-32) runs on threads of its own while the main thread writes
(see archiver/_fastcopy.py). A large weights file stored in a zip, and every large file of a folder
archive, goes further: its blocks are written straight to the archive's file at their offset, with the
CRC-32 zipfile would have computed on the main thread computed on a thread of its own instead.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from archiver._fastcopy import Digests, Progress, copy_hashing, write_at
from archiver.errors import InputFileError
from archiver.manifest import MANIFEST_PATH, FileRecord, Manifest

CHUNK_BYTES = 1 << 20  # tarfile's copy buffer
# Deflating float weights costs much time and saves a few percent: these are stored as they are.
STORED_SUFFIXES = (".pt", ".pt2", ".pth", ".bin", ".safetensors", ".onnx")


def source_date_epoch() -> int | None:
    """SOURCE_DATE_EPOCH as an int, or None when unset (see reproducible-builds.org)."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    return int(value) if value else None


def _zip_time(epoch: float) -> tuple[int, int, int, int, int, int]:
    # Zip cannot record dates before 1980; clamp instead of failing.
    return time.gmtime(max(epoch, 315532800))[:6]


def _copy(source: Path, expected: int, sink: BinaryIO, on_progress: Progress | None) -> FileRecord:
    return copy_hashing(source, expected, sink.write, on_progress)


def _write_stored(
    source: Path, expected: int, out: object, on_progress: Progress | None
) -> FileRecord | None:
    """Copy ``source`` into a ZIP_STORED entry being written as ``out``, straight to the archive's file.

    The bytes zipfile would have written are exactly the file's, so the archive is byte-identical; what
    zipfile's writer would have counted (size, CRC-32, the latter computed on a thread of its own) is
    set on it before it closes. None, having written nothing, where this cannot be done (small file, the
    archive is not a plain file, a zipfile without these internals): write it instead.
    """
    fp = getattr(out, "_fileobj", None)
    if (
        getattr(out, "_compressor", True) is not None
        or not (hasattr(out, "_crc") and hasattr(out, "_file_size"))
        or fp is None
    ):
        return None
    try:
        fp.flush()
        dst, start = fp.fileno(), fp.tell()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    copied = write_at(source, expected, dst, start, crc=True, on_progress=on_progress)
    if copied is None:
        return None
    record, crc = copied
    fp.seek(start + record.size)
    out._file_size = record.size  # type: ignore[attr-defined]
    out._crc = crc  # type: ignore[attr-defined]
    return record


def _copy_to_file(source: Path, expected: int, out: BinaryIO, on_progress: Progress | None) -> FileRecord:
    """A folder archive's file: hashed on threads while written at offsets where it is large."""
    out.flush()
    copied = write_at(source, expected, out.fileno(), 0, crc=False, on_progress=on_progress)
    if copied is None:
        return _copy(source, expected, out, on_progress)
    out.seek(copied[0].size)
    return copied[0]


def write_zip(
    sink: BinaryIO,
    entries: dict[str, Path],
    sizes: dict[str, int],
    manifest: Manifest,
    *,
    compress: bool,
    on_progress: Progress | None = None,
) -> None:
    """A flat .mar: the files at the root, MAR-INF/MANIFEST.json last; weights stored, the rest deflated."""
    epoch = source_date_epoch()
    records: dict[str, FileRecord] = {}
    with zipfile.ZipFile(sink, "w", allowZip64=True) as zf:
        for arcname in sorted(entries):
            source = entries[arcname]
            stamp = epoch if epoch is not None else source.stat().st_mtime
            info = _zip_info(
                arcname, stamp, deflate=compress and not arcname.lower().endswith(STORED_SUFFIXES)
            )
            info.file_size = sizes[arcname]  # lets zipfile choose zip64 up front for big files
            with zf.open(info, "w") as out:
                stored = info.compress_type == zipfile.ZIP_STORED
                record = _write_stored(source, sizes[arcname], out, on_progress) if stored else None
                records[arcname] = record or _copy(source, sizes[arcname], out, on_progress)
        manifest.files = records
        info = _zip_info(MANIFEST_PATH, epoch if epoch is not None else time.time(), deflate=compress)
        zf.writestr(info, manifest.to_json())


def _zip_info(name: str, epoch: float, *, deflate: bool) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_zip_time(epoch))
    info.compress_type = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    info.create_system = 3  # unix, so the permission bits below mean what they say
    info.external_attr = 0o100644 << 16  # a regular file, rw-r--r--
    return info


class _HashingReader:
    """A file reader for tarfile.addfile that hashes (and reports) what tarfile pulls through it."""

    def __init__(self, fh: BinaryIO, source: Path, size: int, on_progress: Progress | None) -> None:
        self._fh = fh
        self._source = source
        self._on_progress = on_progress
        self.digest = Digests(size)
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        if n > 0 and len(data) < n:  # tarfile asks for exactly what is left: the file shrank
            raise InputFileError(f"{self._source} changed while it was being archived")
        self.digest.update(data)
        self.size += len(data)
        if self._on_progress is not None:
            self._on_progress(len(data))
        return data

    def record(self) -> FileRecord:
        return FileRecord(sha256=self.digest.sha256(), size=self.size)


def write_tgz(
    sink: BinaryIO,
    entries: dict[str, Path],
    sizes: dict[str, int],
    manifest: Manifest,
    *,
    top: str,
    on_progress: Progress | None = None,
) -> None:
    """A .tar.gz with every entry under '<top>/', as TorchServe writes it (its server strips that folder)."""
    epoch = source_date_epoch()
    stamp = int(epoch if epoch is not None else time.time())
    records: dict[str, FileRecord] = {}
    # filename="" keeps the temp file's name out of the gzip header (it would break reproducibility).
    with (
        gzip.GzipFile(filename="", fileobj=sink, mode="wb", mtime=stamp, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT, copybufsize=CHUNK_BYTES) as tar,
    ):
        made_dirs: set[str] = set()
        names = sorted(entries) + [MANIFEST_PATH]
        for arcname in names:
            parts = f"{top}/{arcname}".split("/")
            for i in range(1, len(parts)):
                folder = "/".join(parts[:i])
                if folder not in made_dirs:
                    made_dirs.add(folder)
                    tar.addfile(_tar_info(folder, 0, stamp, directory=True))
            if arcname == MANIFEST_PATH:
                manifest.files = records
                data = manifest.to_json()
                reader = _BytesReader(data)
                tar.addfile(_tar_info(f"{top}/{arcname}", len(data), stamp), reader)
                continue
            with open(entries[arcname], "rb") as fh:
                hashing = _HashingReader(fh, entries[arcname], sizes[arcname], on_progress)
                try:
                    tar.addfile(_tar_info(f"{top}/{arcname}", sizes[arcname], stamp), hashing)
                    if fh.read(1):
                        raise InputFileError(f"{entries[arcname]} changed while it was being archived")
                    records[arcname] = hashing.record()
                finally:
                    hashing.digest.close()


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def read(self, n: int = -1) -> bytes:
        data, self._data = (self._data, b"") if n < 0 else (self._data[:n], self._data[n:])
        return data


def _tar_info(name: str, size: int, stamp: int, *, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.size = size
    info.mtime = stamp
    info.mode = 0o755 if directory else 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_folder(
    root: Path,
    entries: dict[str, Path],
    sizes: dict[str, int],
    manifest: Manifest,
    *,
    on_progress: Progress | None = None,
) -> None:
    """The no-archive layout: the files under ``root`` (which must be empty) and MAR-INF/MANIFEST.json."""
    epoch = source_date_epoch()
    records: dict[str, FileRecord] = {}
    for arcname in sorted(entries):
        records[arcname] = _write_file(
            root, arcname, lambda out, a=arcname: _copy_to_file(entries[a], sizes[a], out, on_progress), epoch
        )
    manifest.files = records
    data = manifest.to_json()
    _write_file(root, MANIFEST_PATH, lambda out: out.write(data), epoch)


def _write_file(root: Path, arcname: str, fill: Callable[[BinaryIO], object], epoch: int | None):
    target = root.joinpath(*arcname.split("/"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "xb") as out:
        result = fill(out)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(target, 0o644)
    if epoch is not None:
        os.utime(target, (epoch, epoch))
    return result
