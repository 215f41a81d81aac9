"""A 1 GiB weights file archives with flat memory: bytes are streamed and hashed, never held whole."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

GIB = 1 << 30

# Runs in a fresh interpreter so that ru_maxrss (the peak) belongs to this build alone.
CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    import archiver.build, archiver.reader

    work = Path(sys.argv[1])
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    path = archiver.build.build_archive(
        model_name="big", version="1.0", handler=str(work / "h.py"),
        serialized_file=str(work / "weights.bin"), export_path=str(work / "store"),
        archive_format=sys.argv[2],
    )
    after_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with archiver.reader.open_archive(path) as reader:
        report = reader.verify()
    after_verify = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"baseline": baseline, "build": after_build, "verify": after_verify,
                      "ok": report.ok, "size": path.stat().st_size}))
    """
)


@pytest.mark.slow
def test_one_gib_file_archives_and_verifies_with_flat_memory(tmp_path: Path):
    weights = tmp_path / "weights.bin"
    with open(weights, "wb") as fh:  # sparse: costs no disk, reads back as zeros
        fh.truncate(GIB)
    (tmp_path / "h.py").write_text("def handle(data, context):\n    return data\n")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), "default"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"]
    assert result["size"] > GIB  # stored, not deflated to a few MB
    growth = max(result["build"], result["verify"]) - result["baseline"]
    assert growth < 64 << 20, f"peak RSS grew by {growth / 2**20:.0f} MiB for a 1 GiB file"
