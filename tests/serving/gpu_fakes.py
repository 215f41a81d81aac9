"""A stand-in ``nvidia-smi`` for machines without a GPU: a script on PATH that answers the queries the
server makes (``--query-gpu=…``, ``--query-compute-apps=…``) from a JSON file the test writes, so the
server's real discovery, parsing and ``CUDA_VISIBLE_DEVICES`` mapping run against known GPUs.

The file holds ``{"gpus": [{"index", "uuid", "name", "memory_mb", "used_mb", "util"}],
"apps": [{"pid", "uuid", "used_mb"}]}``; the test may rewrite ``apps`` while the server runs.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCRIPT = """#!{python}
import json, sys
state = json.load(open({state!r}))
args = sys.argv[1:]
query = next((a for a in args if a.startswith("--query-")), "")
if "--format=csv,noheader,nounits" not in args:
    sys.exit("fake nvidia-smi: unexpected arguments " + " ".join(args))
fields = query.split("=", 1)[1].split(",") if "=" in query else []
if query.startswith("--query-gpu="):
    rows = state["gpus"]
    names = {{"index": "index", "uuid": "uuid", "name": "name", "memory.total": "memory_mb",
             "memory.used": "used_mb", "utilization.gpu": "util", "utilization.memory": "mem_util"}}
elif query.startswith("--query-compute-apps="):
    rows = state.get("apps", [])
    names = {{"pid": "pid", "gpu_uuid": "uuid", "used_memory": "used_mb"}}
else:
    sys.exit("fake nvidia-smi: unexpected query " + query)
for row in rows:
    print(", ".join(str(row.get(names[f], "[N/A]")) for f in fields))
"""


@dataclass
class FakeGpus:
    """The fake's folder (put first on PATH) and its state file."""

    folder: Path
    state_file: Path

    def write(self, gpus: list[dict[str, Any]], apps: list[dict[str, Any]] | None = None) -> None:
        self.state_file.write_text(json.dumps({"gpus": gpus, "apps": apps or []}))

    def set_apps(self, apps: list[dict[str, Any]]) -> None:
        state = json.loads(self.state_file.read_text())
        state["apps"] = apps
        self.state_file.write_text(json.dumps(state))

    def path_env(self) -> str:
        return f"{self.folder}{os.pathsep}{os.environ.get('PATH', '')}"


def gpu(index: int, *, memory_mb: int = 81559, used_mb: int = 0, util: int = 0) -> dict[str, Any]:
    return {
        "index": index,
        "uuid": f"GPU-{index:08x}-aaaa-bbbb-cccc-{index:012x}",
        "name": "NVIDIA H100 80GB HBM3",
        "memory_mb": memory_mb,
        "used_mb": used_mb,
        "util": util,
        "mem_util": 0,
    }


def install_fake_nvidia_smi(folder: Path) -> FakeGpus:
    folder.mkdir(parents=True, exist_ok=True)
    state = folder / "state.json"
    script = folder / "nvidia-smi"
    script.write_text(_SCRIPT.format(python=sys.executable, state=str(state)))
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    fake = FakeGpus(folder, state)
    fake.write([])
    return fake
