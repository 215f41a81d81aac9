"""Open a .mar, .tar.gz or folder safely: list, read, verify and unpack it, checking every hash.

``open_archive`` is cheap (a zip's central directory, a tar's headers) and refuses hostile structure at
once: traversal, links, devices, duplicates, bombs. Member bytes are read on demand and checked against
the sha256 and size the manifest records (TorchServe-built archives carry none; they still open).
"""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from archiver._sources import (
    FORMAT_ERRORS,
    DirSource,
    Member,
    Meter,
    ReadLimits,
    ZipSource,
)
from archiver._tgz import TgzSource
from archiver.config import parse_model_config
from archiver.errors import (
    ArchiveFormatError,
    ArchiverError,
    InputFileError,
    IntegrityError,
    ManifestError,
    MemberNotFoundError,
    UsageError,
    reason,
)
from archiver.manifest import MANIFEST_PATH, Manifest

__all__ = ["ArchiveReader", "ReadLimits", "VerifyReport", "open_archive"]


@dataclass
class VerifyReport:
    """What ``verify`` found. ``ok`` is False when anything in ``problems``; ``notes`` are informational."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    has_hashes: bool = False
    notes: list[str] = field(default_factory=list)
    files_checked: int = 0
    sha256: dict[str, str] = field(default_factory=dict)  # computed, for every file that could be read


def open_archive(path: str | Path, *, limits: ReadLimits | None = None) -> ArchiveReader:
    """Open an archive for reading; raises ArchiveFormatError, UnsafeArchiveError or ManifestError."""
    return ArchiveReader(Path(path), limits or ReadLimits())


def _open_source(path: Path, limits: ReadLimits) -> ZipSource | TgzSource | DirSource:
    """Pick the source by content (not by file name): a folder, zip magic, or gzip magic. What the zip,
    tar and gzip modules raise (``FORMAT_ERRORS``) is the caller's to turn into an ArchiveFormatError."""
    if path.is_dir():
        return DirSource(path, limits)
    if not path.is_file():  # a FIFO, socket or device: opening one could wait forever for a writer
        raise ArchiveFormatError(f"{path.name} is not a regular file or a folder, so it is not an archive")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic[:2] == b"PK":
        return ZipSource(path, limits)
    if magic[:2] == b"\x1f\x8b":
        return TgzSource(path, limits)
    raise ArchiveFormatError(f"{path.name} is not a .mar (zip), a .tar.gz or a folder")


class ArchiveReader:
    """A safe, lazy view of one archive. Use as a context manager, or call ``close()``."""

    def __init__(self, path: Path, limits: ReadLimits) -> None:
        self.path = path
        self.limits = limits
        if not path.exists():
            raise InputFileError(f"{path}: no such file or folder")
        try:
            self._source = _open_source(path, limits)
        except ArchiverError:
            raise
        except FORMAT_ERRORS as exc:
            why = reason(exc, typed=False)
            raise ArchiveFormatError(f"{path.name} is not a readable archive: {why}") from exc
        self.format: str = self._source.format
        try:
            self.manifest: Manifest = self._read_manifest()
        except BaseException:
            self._source.close()
            raise
        self.has_hashes: bool = self.manifest.files is not None

    def __enter__(self) -> ArchiveReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._source.close()

    def files(self) -> list[str]:
        """Archive paths of the regular files, sorted, including MAR-INF/MANIFEST.json."""
        return sorted(self._source.members)

    def size(self, name: str) -> int:
        """The stored (uncompressed) size of one member."""
        return self._member(name).size

    def read(self, name: str) -> bytes:
        """One member's bytes, checked against the manifest's sha256 and size when it records them."""
        member = self._member(name)
        digest = hashlib.sha256()
        chunks = []
        for chunk in self._guarded(self._source.stream(member, Meter(self.limits, self.path.name))):
            digest.update(chunk)
            chunks.append(chunk)
        data = b"".join(chunks)
        self._check_hash(name, len(data), digest.hexdigest())
        return data

    def verify(self) -> VerifyReport:
        """Check structure, manifest references, handler and every hash; content problems are reported."""
        report = VerifyReport(ok=True, has_hashes=self.has_hashes)
        if not self.has_hashes:
            report.notes.append(
                "archive carries no hashes (built by TorchServe's archiver?); checked the rest"
            )
        names = set(self._source.members)
        for ref in self._referenced_files():
            if ref not in names:
                report.problems.append(f"the manifest names {ref!r}, which is not in the archive")
        records = self.manifest.files or {}
        for listed in sorted(records):
            if listed not in names:
                report.problems.append(f"{listed!r} is listed in the manifest's hashes but absent")
        meter = Meter(self.limits, self.path.name)
        try:
            for member, chunks in self._all_members(meter):
                problem = self._check_member(member, chunks, report)
                report.files_checked += 1
                if problem:
                    report.problems.append(problem)
        except ArchiverError as exc:
            report.problems.append(exc.message)
        report.problems.extend(self._check_contents(names))
        report.problems = list(dict.fromkeys(report.problems))  # a bad handler fails two checks: say it once
        report.ok = not report.problems
        return report

    def extract(self, dest: str | Path) -> Path:
        """Unpack every file into ``dest`` (absent or empty), all or nothing; returns ``dest``.

        Files land in a private temp folder beside ``dest`` first and are renamed into place only when all
        of them passed their checks, so a refused archive leaves nothing behind.
        """
        dest = Path(dest)
        if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
            raise UsageError(f"cannot extract into {dest}: it exists and is not an empty folder")
        names = set(self._source.members)
        missing = [ref for ref in self._referenced_files() if ref not in names]
        if missing:
            raise IntegrityError(
                f"{self.path.name}: the manifest names {missing[0]!r}, which is not in the archive"
            )
        for listed in sorted(self.manifest.files or {}):
            if listed not in names:
                raise IntegrityError(
                    f"{self.path.name}: {listed!r} is listed in the manifest's hashes but absent"
                )
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
        try:
            meter = Meter(self.limits, self.path.name)
            for member, chunks in self._all_members(meter):
                self._write_member(staging, member, chunks)
            os.chmod(staging, 0o755)
            os.rename(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return dest

    # -- internals -------------------------------------------------------------------------------

    def _member(self, name: str) -> Member:
        member = self._source.members.get(name)
        if member is None:
            raise MemberNotFoundError(f"{self.path.name} has no file {name!r}")
        return member

    def _all_members(self, meter: Meter) -> Iterator[tuple[Member, Iterator[bytes]]]:
        for member, chunks in self._guarded(self._source.iter_all(meter)):
            yield member, self._guarded(chunks)

    def _guarded(self, items: Iterator) -> Iterator:
        """Re-raise the zip/tar/zlib modules' errors for corrupt bytes as ArchiveFormatError."""
        try:
            yield from items
        except ArchiverError:
            raise
        except FORMAT_ERRORS as exc:
            raise ArchiveFormatError(f"{self.path.name} is corrupt: {reason(exc, typed=False)}") from exc

    def _read_manifest(self) -> Manifest:
        member = self._source.members.get(MANIFEST_PATH)
        if member is None:
            raise ManifestError(f"{self.path.name} has no {MANIFEST_PATH}")
        if member.size > self.limits.max_manifest_bytes:
            raise ManifestError(f"{self.path.name}: {MANIFEST_PATH} is {member.size} bytes, over the limit")
        meter = Meter(self.limits, self.path.name)
        data = b"".join(self._guarded(self._source.stream(member, meter)))
        try:
            return Manifest.from_json(data)
        except ManifestError as exc:
            raise ManifestError(f"{self.path.name}: {exc.message}") from exc

    def _referenced_files(self) -> list[str]:
        refs = [self.manifest.serialized_file, self.manifest.model_file]
        refs += [self.manifest.requirements_file, self.manifest.config_file]
        if self.manifest.runtime != "LSP":  # C++ handlers are shared libraries, not .py files
            refs.append(self.manifest.handler_file())
        return [r for r in refs if r]

    def _check_hash(self, name: str, size: int, sha256: str) -> None:
        if name == MANIFEST_PATH or self.manifest.files is None:
            return
        record = self.manifest.files.get(name)
        if record is None:
            raise IntegrityError(f"{self.path.name}: {name!r} is not recorded in the manifest's hashes")
        if record.size != size:
            raise IntegrityError(
                f"{self.path.name}: {name!r} is {size} bytes, the manifest says {record.size}"
            )
        if record.sha256 != sha256:
            raise IntegrityError(f"{self.path.name}: {name!r} does not match its sha256 in the manifest")

    def _hash_chunks(self, member: Member, chunks: Iterator[bytes], sink=None) -> tuple[int, str]:
        record = (self.manifest.files or {}).get(member.name)
        digest = hashlib.sha256()
        size = 0
        for chunk in chunks:
            size += len(chunk)
            if record is not None and size > record.size:  # stop a lying member early
                raise IntegrityError(
                    f"{self.path.name}: {member.name!r} is larger than the manifest's {record.size} bytes"
                )
            digest.update(chunk)
            if sink is not None:
                sink.write(chunk)
        return size, digest.hexdigest()

    def _check_member(self, member: Member, chunks: Iterator[bytes], report: VerifyReport) -> str | None:
        try:
            size, sha = self._hash_chunks(member, chunks)
            report.sha256[member.name] = sha
            self._check_hash(member.name, size, sha)
        except IntegrityError as exc:
            return exc.message
        return None

    def _write_member(self, root: Path, member: Member, chunks: Iterator[bytes]) -> None:
        target = root.joinpath(*member.name.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(target, flags, 0o644), "wb") as sink:
            size, sha = self._hash_chunks(member, chunks, sink)
        self._check_hash(member.name, size, sha)

    def _check_contents(self, names: set[str]) -> list[str]:
        """Parse what the server will parse: the handler module and the model-config YAML."""
        problems = []
        handler = self.manifest.handler_file() if self.manifest.runtime != "LSP" else None
        config = self.manifest.config_file
        for name, check in ((handler, _check_python), (config, _check_yaml)):
            if not name or name not in names:
                continue
            try:
                check(name, self.read(name))
            except ArchiverError as exc:
                problems.append(exc.message)
        return problems


def _check_python(name: str, data: bytes) -> None:
    try:
        ast.parse(data, filename=name)
    except (SyntaxError, ValueError) as exc:
        line = getattr(exc, "lineno", None)
        reason = getattr(exc, "msg", None) or str(exc)
        raise ArchiverError(
            f"handler {name} does not parse{f' (line {line})' if line else ''}: {reason}"
        ) from exc


def _check_yaml(name: str, data: bytes) -> None:
    parse_model_config(data, source=name)
