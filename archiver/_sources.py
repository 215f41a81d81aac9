"""Member sources: list and stream the regular files of a zip, a tar.gz or a folder, trusting nothing.

Each source turns its container's entries into safe relative names (no ``..``, no absolute paths, no
links or devices, no duplicates) and streams member bytes through a meter that bounds the total size and
the compression ratio by the bytes actually produced, not by what the headers claim.
"""

from __future__ import annotations

import gzip
import os
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archiver.errors import ArchiveFormatError, UnsafeArchiveError

CHUNK_BYTES = 1 << 20
# What the zip, tar and gzip modules raise for bytes that are not what they should be.
FORMAT_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tarfile.TarError,
    gzip.BadGzipFile,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    NotImplementedError,
    struct.error,
    IndexError,
    KeyError,
    OverflowError,
    UnicodeError,
)
_DRIVE = re.compile(r"^[A-Za-z]:")
MAX_NAME_DEPTH = 32


@dataclass(frozen=True)
class ReadLimits:
    """Bounds that stop a hostile archive from running away with disk, memory or time.

    ``max_ratio`` applies to an entry (zip) or to the whole stream (tar.gz) once it has produced more than
    ``ratio_floor_bytes``, so small, very compressible files (configs, zero-filled test weights) pass.
    """

    max_total_bytes: int = 16 << 30
    max_ratio: float = 200.0
    ratio_floor_bytes: int = 8 << 20
    max_entries: int = 100_000
    max_manifest_bytes: int = 16 << 20


@dataclass(frozen=True)
class Member:
    """One regular file of the archive: its safe name, declared size and where to find it."""

    name: str
    size: int
    compressed_size: int | None
    ref: Any


def safe_name(raw: str, where: str) -> str:
    """Normalise an entry name to 'a/b/c', refusing anything that could land outside the destination."""
    if "\x00" in raw or "\\" in raw:
        raise UnsafeArchiveError(f"{where}: entry {raw!r} has a NUL or backslash in its name")
    if raw.startswith("/") or _DRIVE.match(raw):
        raise UnsafeArchiveError(f"{where}: entry {raw!r} has an absolute path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{where}: entry {raw!r} climbs out of the archive with '..'")
    # Names no file system could hold would fail halfway through an extraction: refuse them up front.
    if len(parts) > MAX_NAME_DEPTH or any(len(p.encode("utf-8", "surrogateescape")) > 255 for p in parts):
        raise UnsafeArchiveError(f"{where}: entry {raw[:80]!r}... is nested too deep or has too long a name")
    return "/".join(parts)


def check_layout(names: list[str], where: str) -> None:
    """Refuse duplicate names and a name that is both a file and a folder (e.g. 'a' and 'a/b')."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise UnsafeArchiveError(f"{where}: duplicate entry {name!r}")
        seen.add(name)
    for name in names:
        parts = name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in seen:
                raise UnsafeArchiveError(f"{where}: {'/'.join(parts[:i])!r} is both a file and a folder")


class Meter:
    """Counts bytes produced and refuses once the total or the ratio to the bytes consumed is too high."""

    def __init__(self, limits: ReadLimits, where: str) -> None:
        self.limits = limits
        self.where = where
        self.total = 0

    def add(self, produced: int) -> None:
        self.total += produced
        if self.total > self.limits.max_total_bytes:
            raise UnsafeArchiveError(
                f"{self.where}: unpacks to more than {self.limits.max_total_bytes} bytes (limit); refused"
            )

    def check_ratio(self, produced: int, consumed: int, what: str) -> None:
        if produced > self.limits.ratio_floor_bytes and produced > self.limits.max_ratio * max(consumed, 1):
            raise UnsafeArchiveError(
                f"{self.where}: {what} expands more than {self.limits.max_ratio:g}x "
                f"({produced} bytes from {consumed}); refused as a decompression bomb"
            )


class ZipSource:
    """Members of a zip (.mar); cheap to open: only the central directory is read."""

    format = "zip"

    def __init__(self, path: Path, limits: ReadLimits) -> None:
        self.where = path.name
        self.limits = limits
        self.zf = zipfile.ZipFile(path)
        try:
            self.members = self._scan(path)
        except BaseException:
            self.zf.close()
            raise

    def _scan(self, path: Path) -> dict[str, Member]:
        limits = self.limits
        infos = self.zf.infolist()
        if len(infos) > limits.max_entries:
            raise UnsafeArchiveError(
                f"{self.where}: {len(infos)} entries, over the limit of {limits.max_entries}"
            )
        members: list[Member] = []
        compressed_total = declared_total = 0
        for info in infos:
            mode = info.external_attr >> 16
            name = safe_name(info.filename, self.where)
            kind = stat.S_IFMT(mode)  # 0 when the writer set only permission bits (TorchServe's manifest)
            if info.is_dir() or kind == stat.S_IFDIR:
                continue
            if kind and kind != stat.S_IFREG:
                raise UnsafeArchiveError(
                    f"{self.where}: entry {info.filename!r} is a link or device, not a file"
                )
            if info.flag_bits & 0x1:
                raise ArchiveFormatError(f"{self.where}: entry {info.filename!r} is encrypted")
            if not name:
                raise UnsafeArchiveError(f"{self.where}: entry {info.filename!r} has an empty name")
            compressed_total += info.compress_size
            declared_total += info.file_size
            meter = Meter(limits, self.where)
            meter.check_ratio(info.file_size, info.compress_size, f"entry {name!r}")
            members.append(Member(name, info.file_size, info.compress_size, info))
        if compressed_total > path.stat().st_size:
            raise UnsafeArchiveError(f"{self.where}: entries overlap (a zip-bomb construction); refused")
        Meter(limits, self.where).add(declared_total)
        check_layout([m.name for m in members], self.where)
        return {m.name: m for m in members}

    def stream(self, member: Member, meter: Meter) -> Iterator[bytes]:
        produced = 0
        with self.zf.open(member.ref) as fh:
            while chunk := fh.read(CHUNK_BYTES):
                produced += len(chunk)
                meter.add(len(chunk))
                meter.check_ratio(produced, member.compressed_size or 0, f"entry {member.name!r}")
                yield chunk

    def iter_all(self, meter: Meter) -> Iterator[tuple[Member, Iterator[bytes]]]:
        for member in sorted(self.members.values(), key=lambda m: m.ref.header_offset):
            yield member, self.stream(member, meter)

    def close(self) -> None:
        self.zf.close()


class DirSource:
    """Regular files under a folder (a no-archive model); links, devices and fifos are refused."""

    format = "dir"
    _SKIP_DIRS = ("__pycache__",)

    def __init__(self, path: Path, limits: ReadLimits) -> None:
        self.root = path
        self.where = path.name or str(path)
        members: list[Member] = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if d not in self._SKIP_DIRS)
            for entry in [*dirnames, *filenames]:
                full = Path(dirpath, entry)
                rel = full.relative_to(path).as_posix()
                st = full.lstat()
                if stat.S_ISLNK(st.st_mode):
                    raise UnsafeArchiveError(f"{self.where}: {rel!r} is a symbolic link")
                if stat.S_ISDIR(st.st_mode):
                    continue
                if not stat.S_ISREG(st.st_mode):
                    raise UnsafeArchiveError(f"{self.where}: {rel!r} is a device, fifo or socket, not a file")
                members.append(Member(safe_name(rel, self.where), st.st_size, None, full))
                if len(members) > limits.max_entries:
                    raise UnsafeArchiveError(f"{self.where}: over the limit of {limits.max_entries} files")
        self.members = {m.name: m for m in members}

    def stream(self, member: Member, meter: Meter) -> Iterator[bytes]:
        fd = os.open(member.ref, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as fh:
            while chunk := fh.read(CHUNK_BYTES):
                meter.add(len(chunk))
                yield chunk

    def iter_all(self, meter: Meter) -> Iterator[tuple[Member, Iterator[bytes]]]:
        for name in sorted(self.members):
            yield self.members[name], self.stream(self.members[name], meter)

    def close(self) -> None:
        pass
