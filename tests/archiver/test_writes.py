"""How archives are written: reproducible, atomic, no stale files, nothing staged in /tmp/<name>."""

from __future__ import annotations

import errno
import os
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest

import archiver
from archiver.build import remove_stale_temps
from archiver.errors import InputFileError


@pytest.mark.parametrize("archive_format", ["default", "zip-store", "tgz"])
def test_same_inputs_give_the_same_bytes_with_source_date_epoch(
    model_inputs, epoch, archive_format, tmp_path
):
    kwargs = model_inputs.build_kwargs(archive_format=archive_format, config_file=str(model_inputs.config))
    first = archiver.build_archive(**{**kwargs, "export_path": str(tmp_path / "one")})
    for path in (model_inputs.root / "src").iterdir():  # different file times must not matter
        os.utime(path, (epoch + 12345, epoch + 12345))
    second = archiver.build_archive(**{**kwargs, "export_path": str(tmp_path / "two")})
    assert first.read_bytes() == second.read_bytes()


def test_zip_entries_have_fixed_times_and_permissions(model_inputs, epoch):
    path = archiver.build_archive(**model_inputs.build_kwargs())
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
    assert [i.filename for i in infos] == sorted(i.filename for i in infos[:-1]) + ["MAR-INF/MANIFEST.json"]
    assert {i.date_time for i in infos} == {(2023, 11, 14, 22, 13, 20)}
    assert {i.external_attr >> 16 for i in infos} == {0o100644}


def test_tgz_entries_have_fixed_owner_times_and_permissions(model_inputs, epoch):
    path = archiver.build_archive(**model_inputs.build_kwargs(archive_format="tgz"))
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    files = [m for m in members if m.isfile()]
    assert {(m.mtime, m.uid, m.gid, m.mode) for m in files} == {(epoch, 0, 0, 0o644)}


def test_no_archive_folder_is_reproducible_too(model_inputs, epoch, tmp_path):
    one = archiver.build_archive(
        **model_inputs.build_kwargs(archive_format="no-archive", export_path=str(tmp_path / "1"))
    )
    two = archiver.build_archive(
        **model_inputs.build_kwargs(archive_format="no-archive", export_path=str(tmp_path / "2"))
    )

    def tree(root: Path) -> list[tuple[str, bytes, int, int]]:
        return [
            (str(p.relative_to(root)), p.read_bytes(), p.stat().st_mode & 0o777, int(p.stat().st_mtime))
            for p in sorted(root.rglob("*"))
            if p.is_file()
        ]

    assert tree(one) == tree(two)
    assert {mtime for *_, mtime in tree(one)} == {epoch}


def big_weights(model_inputs, size: int = 3 << 20) -> None:
    model_inputs.weights.write_bytes(os.urandom(size))


@pytest.mark.parametrize("archive_format", ["default", "tgz", "no-archive"])
def test_a_write_failing_midway_keeps_the_old_archive_and_leaves_no_temp_file(model_inputs, archive_format):
    old = archiver.build_archive(**model_inputs.build_kwargs(archive_format=archive_format))
    before = _snapshot(old)
    big_weights(model_inputs)
    written = []

    def disk_full_after_a_megabyte(n: int) -> None:
        written.append(n)
        if sum(written) > 1 << 20:
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        archiver.build_archive(
            **model_inputs.build_kwargs(archive_format=archive_format, version="2.0", force=True),
            on_progress=disk_full_after_a_megabyte,
        )
    assert sum(written) > 1 << 20, "the failure must happen midway through the write"
    assert _snapshot(old) == before
    assert sorted(p.name for p in old.parent.iterdir()) == [old.name]


@pytest.mark.parametrize("archive_format", ["default", "tgz", "no-archive"])
def test_an_input_that_changes_while_archiving_is_refused(model_inputs, archive_format):
    old = archiver.build_archive(**model_inputs.build_kwargs(archive_format=archive_format))
    before = _snapshot(old)
    big_weights(model_inputs)

    def shrink_the_weights(n: int) -> None:
        with open(model_inputs.weights, "r+b") as fh:
            fh.truncate(1 << 20)

    with pytest.raises(InputFileError, match=r"weights\.pt changed while it was being archived"):
        archiver.build_archive(
            **model_inputs.build_kwargs(archive_format=archive_format, force=True),
            on_progress=shrink_the_weights,
        )
    assert _snapshot(old) == before
    assert sorted(p.name for p in old.parent.iterdir()) == [old.name]


def test_no_archive_force_leaves_no_stale_files(model_inputs):
    folder = archiver.build_archive(**model_inputs.build_kwargs(archive_format="no-archive"))
    (folder / "stale.txt").write_text("from an older build")
    archiver.build_archive(
        **model_inputs.build_kwargs(archive_format="no-archive", extra_files=None, force=True)
    )
    assert sorted(p.name for p in folder.iterdir()) == ["MAR-INF", "my_handler.py", "weights.pt"]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny"]


def test_temp_files_of_dead_builds_are_removed_by_the_next_build(model_inputs):
    store = model_inputs.root / "model-store"
    store.mkdir()
    dead_pid = _dead_pid()
    stale_file = store / f".tiny.mar.{dead_pid}.abc123.partial"
    stale_file.write_bytes(b"half an archive")
    stale_dir = store / f".tiny.mar.{dead_pid}.def456.old"
    stale_dir.mkdir()
    alive = store / f".tiny.mar.{os.getppid()}.xyz.partial"  # a build that is still running
    alive.write_bytes(b"in progress")
    unrelated = store / ".other.mar.1.x.partial"
    unrelated.write_bytes(b"not ours")
    archiver.build_archive(**model_inputs.build_kwargs())
    assert sorted(p.name for p in store.iterdir()) == sorted([alive.name, unrelated.name, "tiny.mar"])
    assert remove_stale_temps(store / "tiny.mar") == []


def test_nothing_is_staged_in_tmp_under_the_model_name(model_inputs):
    victim = Path(tempfile.gettempdir()) / "tiny"
    existed = victim.exists()
    victim.mkdir(exist_ok=True)
    marker = victim / "important.txt"
    marker.write_text("keep me")
    try:
        archiver.build_archive(**model_inputs.build_kwargs())
        assert marker.read_text() == "keep me"
    finally:
        marker.unlink()
        if not existed:
            victim.rmdir()


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    return proc.pid


def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
