"""SIGKILL model-archiver at random points while it writes: the target is always old or new, never partial."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import archiver

WEIGHTS_BYTES = 192 << 20


def start_build(work: Path, version: str) -> subprocess.Popen:
    script = Path(sys.executable).parent / "model-archiver"
    args = ["--model-name", "big", "-v", version, "--handler", "h.py", "--serialized-file", "weights.bin"]
    return subprocess.Popen(
        [str(script), *args, "--export-path", "store", "-f"],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def kill_when(proc: subprocess.Popen, store: Path, written_fraction: float) -> None:
    """SIGKILL the build once its temp file holds that fraction of the weights (or it has finished)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        temps = list(store.glob(".big.mar.*.partial"))
        sizes = [t.stat().st_size for t in temps if t.exists()]
        if sizes and max(sizes) >= written_fraction * WEIGHTS_BYTES:
            break
        time.sleep(0.002)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.mark.slow
def test_sigkill_during_writes_never_leaves_a_partial_archive(tmp_path: Path):
    work = tmp_path
    with open(work / "weights.bin", "wb") as fh:
        fh.truncate(WEIGHTS_BYTES)
    (work / "h.py").write_text("def handle(data, context):\n    return data\n")
    store = work / "store"
    target = store / "big.mar"
    first = archiver.build_archive(
        model_name="big",
        version="0",
        handler=str(work / "h.py"),
        serialized_file=str(work / "weights.bin"),
        export_path=str(store),
    )
    assert first == target
    rng = random.Random(7)
    current = "0"
    for attempt in range(1, 6):
        proc = start_build(work, str(attempt))
        kill_when(proc, store, rng.choice([0.0, rng.random(), rng.random(), 0.99]))
        with archiver.open_archive(target) as reader:
            report = reader.verify()
            version = reader.manifest.model_version
        assert report.ok, report.problems
        assert version in (current, str(attempt)), "the target is the old archive or the new one"
        current = version

    killed_temps = list(store.glob(".big.mar.*"))
    assert killed_temps, "at least one build must have been killed midway, leaving its temp file"
    proc = start_build(work, "final")
    assert proc.wait(timeout=120) == 0
    with archiver.open_archive(target) as reader:
        assert reader.manifest.model_version == "final" and reader.verify().ok
    assert sorted(p.name for p in store.iterdir()) == ["big.mar"], f"left behind: {killed_temps}"
    assert os.stat(target).st_size > WEIGHTS_BYTES
