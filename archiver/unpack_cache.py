"""The unpack cache: each archive is unpacked once, into a folder named by the sha256 of its content.

TorchServe re-extracts every archive into a fresh ``/tmp/models/<uuid>`` on every start. Here the folder
name is the archive's content hash, so a second load (another worker, a restart) finds the folder and
skips unpacking, and a changed archive can never be mistaken for the old one. The reader unpacks into a
private temp folder and renames it into place only when every file passed its hash check, so a folder
that exists under its hash is complete; two processes racing to unpack the same archive both end up
using the one that won the rename.

Whoever verified an archive's signature (the server before any worker starts, a Ray replica, the
KServe runtime) passes the signed sha256 down as ``unpack_cached(signed_sha256=…)`` (through
``load_model``, and a worker's start message): the archive is then unpacked (or its folder reused) only
if its bytes are those, so an archive replaced after its check is refused instead of run. The pin is
an argument, never an environment variable, so no operator's shell can set it for every model. It
costs no extra read: the hashing pass that names the folder computes it too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import uuid
from pathlib import Path

from archiver.errors import ArchiverError, TamperedArchiveError, UnsignableSourceError, UsageError
from archiver.manifest import MANIFEST_PATH
from archiver.reader import ArchiveReader

CACHE_ENV = "MODEL_ARCHIVER_CACHE"
_LAYOUT = "v2"  # bump when the cache's folder layout changes, so old entries are simply not found
_CHUNK = 1 << 20
# (device, inode, size, mtime) -> (content key, the file's own sha256)
_KEYS: dict[tuple[int, int, int, int], tuple[str, str | None]] = {}
_KEYS_LOCK = threading.Lock()
_UNPACK_LOCKS: dict[str, threading.Lock] = {}


def default_cache_dir() -> Path:
    """``$MODEL_ARCHIVER_CACHE``, else ``~/.cache/model-archiver``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "model-archiver"


def content_key(reader: ArchiveReader) -> str:
    """The sha256 naming an archive's cache folder: of the file's bytes, or of a folder's files.

    A file's key is remembered for this process by (device, inode, size, mtime), so the workers of one
    model hash its archive once; an archive rewritten in place (atomically, as build_archive does) gets
    a new inode and is hashed again.
    """
    return _digests(reader)[0]


def _digests(reader: ArchiveReader) -> tuple[str, str | None]:
    """(content key, the file's plain sha256: None for a folder), from one read of the bytes."""
    stamp = None
    if reader.format != "dir":
        info = os.stat(reader.path)
        stamp = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        with _KEYS_LOCK:
            known = _KEYS.get(stamp)
        if known is not None:
            return known
    digests = _hash_content(reader)
    if stamp is not None:
        with _KEYS_LOCK:
            _KEYS[stamp] = digests
    return digests


def _hash_content(reader: ArchiveReader) -> tuple[str, str | None]:
    digest = hashlib.sha256(_LAYOUT.encode())
    if reader.format == "dir":
        # A folder has no single byte stream; hash every file's name and content, in sorted order.
        for name in reader.files():
            digest.update(name.encode("utf-8") + b"\0")
            with open(reader.path.joinpath(*name.split("/")), "rb") as stream:
                while chunk := stream.read(_CHUNK):
                    digest.update(chunk)
            digest.update(b"\0")
        return digest.hexdigest(), None
    # A file's key is derived from its plain sha256, so one hash of the bytes gives both the key and
    # what a signature pin is checked against.
    plain = hashlib.sha256()
    with open(reader.path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            plain.update(chunk)
    digest.update(plain.digest())
    return digest.hexdigest(), plain.hexdigest()


def _check_pin(reader: ArchiveReader, sha256: str | None, pinned: str | None) -> None:
    """Refuse bytes other than those whose signature was verified (``pinned``, their sha256)."""
    if not pinned:
        return
    if sha256 is None:
        raise UnsignableSourceError(f"{reader.path.name} is a folder archive; only a signed file is loaded")
    if sha256 != pinned:
        raise TamperedArchiveError(
            f"{reader.path.name} changed after its signature was verified (its sha256 is now "
            f"{sha256[:16]}…, the signed one {pinned[:16]}…); it is not loaded"
        )


def cache_subfolder(cache_dir: str | Path | None, name: str) -> Path:
    """``<cache>/<name>`` (the default cache when ``cache_dir`` is None), created if missing."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = (root / name).absolute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArchiverError(f"cannot create the cache folder {folder}: {exc.strerror}") from exc
    return folder


def unpack_cached(
    reader: ArchiveReader, cache_dir: str | Path | None = None, *, signed_sha256: str | None = None
) -> tuple[Path, bool]:
    """The folder holding ``reader``'s files, unpacking it first if needed; and whether it unpacked.

    ``signed_sha256``: the sha256 a signature check verified; other bytes raise TamperedArchiveError.
    """
    models = cache_subfolder(cache_dir, "models")
    key, sha256 = _digests(reader)
    _check_pin(reader, sha256, signed_sha256)
    target = models / key
    with _lock_for(key):  # workers of one process unpack one at a time; other processes may race
        if _intact(target, reader):
            return target, False
        if target.exists() or target.is_symlink():
            # Folders appear complete (renamed into place): if this one is not intact a second look
            # later, it was damaged by hand (files deleted or truncated), so unpack it again.
            if _intact(target, reader):
                return target, False
            try:
                discard_folder(target)
            except OSError as exc:
                raise ArchiverError(
                    f"cannot replace the damaged cache folder {target}: {exc.strerror}"
                ) from exc
        try:
            reader.extract(target)
        except (OSError, UsageError):
            # Another process renamed its copy into place first; theirs is as good as ours.
            if _intact(target, reader):
                return target, False
            raise
    return target, True


def _lock_for(key: str) -> threading.Lock:
    with _KEYS_LOCK:
        return _UNPACK_LOCKS.setdefault(key, threading.Lock())


def _intact(folder: Path, reader: ArchiveReader) -> bool:
    """The folder holds every file of the archive at its size (a stat per file, no hashing)."""
    if not folder.is_dir() or folder.is_symlink() or not (folder / MANIFEST_PATH).is_file():
        return False
    try:
        return all(
            folder.joinpath(*name.split("/")).stat().st_size == reader.size(name) for name in reader.files()
        )
    except OSError:
        return False


def discard_folder(folder: Path) -> None:
    """Move a folder aside (one rename, so nobody finds it half deleted), then delete it.

    Raises OSError when it cannot be moved; a folder already gone is fine.
    """
    aside = folder.with_name(f".{folder.name}.discard-{uuid.uuid4().hex}")
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        return
    if aside.is_symlink() or not aside.is_dir():
        aside.unlink()
    else:
        shutil.rmtree(aside, ignore_errors=True)
