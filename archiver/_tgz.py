"""The tar.gz member source: TorchServe's tgz layout, read in one metered pass, members streamed on demand.

tar has no index, so opening reads the whole stream once; every byte inflated counts against the total and
the compression ratio, and pax / GNU long-name headers are bounded before tarfile reads them whole.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from archiver._sources import CHUNK_BYTES, Member, Meter, ReadLimits, check_layout, safe_name
from archiver.errors import ArchiveFormatError, UnsafeArchiveError


class _CountingReader(io.RawIOBase):
    """A read-only file wrapper that counts the compressed bytes a decompressor pulls."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        buffer[: len(data)] = data
        self.count += len(data)
        return len(data)


class _Inflated(io.RawIOBase):
    """The decompressed side of a tar.gz, metered: every read counts against the total and the ratio."""

    def __init__(self, gz: gzip.GzipFile, counter: _CountingReader, meter: Meter) -> None:
        self.gz, self.counter, self.meter = gz, counter, meter
        self.position = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.gz.read(len(buffer))
        buffer[: len(data)] = data
        self.position += len(data)
        self.meter.check_ratio(self.position, self.counter.count, "the archive")
        return len(data)

    def take(self, size: int, what: str) -> bytes:
        data = self.read(size)
        if len(data) != size:
            raise ArchiveFormatError(f"{self.meter.where}: truncated archive (in {what})")
        return data


class _GuardedTarInfo(tarfile.TarInfo):
    """Refuses oversized pax / GNU long-name headers, which tarfile would otherwise read whole into memory."""

    _META_TYPES = (
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    )

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in self._META_TYPES and self.size > _MAX_TAR_META_BYTES:
            raise UnsafeArchiveError(
                f"tar metadata header of {self.size} bytes (limit {_MAX_TAR_META_BYTES})"
            )
        return super()._proc_member(tarfile_)


_MAX_TAR_META_BYTES = 1 << 20


def _guarded(tar: tarfile.TarFile, where: str) -> Iterator[tarfile.TarInfo]:
    """Iterate a tar's members, naming the archive in the refusal of an oversized metadata header."""
    try:
        yield from tar
    except UnsafeArchiveError as exc:
        if exc.message.startswith(where):
            raise
        raise UnsafeArchiveError(f"{where}: {exc.message}") from exc


class TgzSource:
    """Members of a tar.gz; TorchServe puts every entry under '<model_name>/', which is stripped here.

    Opening reads the whole stream once (tar has no index); members are read by streaming up to them.
    """

    format = "tgz"

    def __init__(self, path: Path, limits: ReadLimits) -> None:
        self.path = path
        self.where = path.name
        self.limits = limits
        disk_size = path.stat().st_size
        members: list[Member] = []
        top: str | None = None
        with (
            self._inflate(Meter(limits, self.where)) as inflated,
            tarfile.open(
                fileobj=io.BufferedReader(inflated, CHUNK_BYTES), mode="r|", tarinfo=_GuardedTarInfo
            ) as tar,
        ):
            for count, info in enumerate(_guarded(tar, self.where), 1):
                if count > limits.max_entries:
                    raise UnsafeArchiveError(f"{self.where}: over the limit of {limits.max_entries} entries")
                safe_name(info.name, self.where)
                # Strip the first component as TorchServe does: 'm/x' and './x' both give 'x'.
                parts = [p for p in info.name.split("/") if p]
                first, rest = (parts[0] if parts else ""), safe_name("/".join(parts[1:]), self.where)
                top = first if top is None else top
                if first != top:
                    raise ArchiveFormatError(
                        f"{self.where}: entries must share one top-level folder ({top!r} and {first!r})"
                    )
                if info.isdir():
                    continue
                if not info.isreg() or info.issparse():
                    raise UnsafeArchiveError(
                        f"{self.where}: entry {info.name!r} is a link or device, not a file"
                    )
                if not rest:
                    raise ArchiveFormatError(
                        f"{self.where}: file {info.name!r} is outside the top-level folder"
                    )
                # Refuse before inflating: a tar entry's size is exact (the next header sits after it).
                end = info.offset_data + info.size
                Meter(limits, self.where).add(end)
                Meter(limits, self.where).check_ratio(end, disk_size, "the archive")
                members.append(Member(rest, info.size, None, info.offset_data))
        check_layout([m.name for m in members], self.where)
        self.members = {m.name: m for m in members}

    @contextmanager
    def _inflate(self, meter: Meter) -> Iterator[_Inflated]:
        with open(self.path, "rb") as fh:
            counter = _CountingReader(fh)
            with gzip.GzipFile(fileobj=io.BufferedReader(counter, CHUNK_BYTES), mode="rb") as gz:
                yield _Inflated(gz, counter, meter)

    def _member_chunks(self, inflated: _Inflated, member: Member, meter: Meter) -> Iterator[bytes]:
        while inflated.position < member.ref:
            inflated.take(min(CHUNK_BYTES, member.ref - inflated.position), member.name)
        left = member.size
        while left:
            chunk = inflated.take(min(CHUNK_BYTES, left), member.name)
            left -= len(chunk)
            meter.add(len(chunk))
            yield chunk

    def stream(self, member: Member, meter: Meter) -> Iterator[bytes]:
        with self._inflate(Meter(self.limits, self.where)) as inflated:
            yield from self._member_chunks(inflated, member, meter)

    def iter_all(self, meter: Meter) -> Iterator[tuple[Member, Iterator[bytes]]]:
        with self._inflate(Meter(self.limits, self.where)) as inflated:
            for member in sorted(self.members.values(), key=lambda m: m.ref):
                yield member, self._member_chunks(inflated, member, meter)

    def close(self) -> None:
        pass
