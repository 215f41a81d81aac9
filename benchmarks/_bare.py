"""The bare model, for benchmarks/serve.py: what one batch costs with no server at all.

Each process of a shape (one with 2 torch threads, or two with 1 thread side by side) runs this file
as a script, ``python benchmarks/_bare.py RESNET.pt KITTEN.jpg TINY.pt THREADS DURATION_S``, and is
driven over stdin so that several processes measure at the same moment: ``warm PHASE`` (answers
``BARE {"warm": PHASE}``), then ``run PHASE`` (answers ``BARE`` and the phase's step times, sorted);
``quit`` ends it. Phases: ``batchN`` (decode + preprocess + forward + top-1 of N kitten photos, the
served handler's work) and ``tinyN`` (N JSON rows through the tiny model, parsed and answered as JSON).
``run_bare`` (imported by serve.py) starts and drives them.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import KITTEN, MemorySampler


# ---- the measuring process ----------------------------------------------------------------------
def child() -> None:
    import torch
    from PIL import Image
    from torchvision import transforms

    transform = transforms.Compose(  # the same preprocessing as the served handler
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    resnet_path, kitten_path, tiny_path, threads, duration = sys.argv[1:6]
    torch.set_num_threads(int(threads))
    model = torch.jit.load(resnet_path).eval()
    tiny = torch.jit.load(tiny_path).eval()
    kitten = Path(kitten_path).read_bytes()
    body = json.dumps([0.1, 0.2, 0.3, 0.4]).encode()

    def resnet_step(n: int) -> None:
        x = torch.stack([transform(Image.open(io.BytesIO(kitten)).convert("RGB")) for _ in range(n)])
        with torch.inference_mode():
            model(x).softmax(dim=1).max(dim=1)

    def tiny_step(n: int) -> None:
        rows = [json.loads(body) for _ in range(n)]
        with torch.inference_mode():
            [json.dumps(r) for r in tiny(torch.tensor(rows)).tolist()]

    def step_for(phase: str):
        for prefix, fn in (("batch", resnet_step), ("tiny", tiny_step)):
            if phase.startswith(prefix):
                n = int(phase[len(prefix) :])
                return n, functools.partial(fn, n)
        raise SystemExit(f"unknown phase {phase!r}")

    print("BARE " + json.dumps({"loaded": True}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        n, step = step_for(words[1])
        if words[0] == "warm":
            for _ in range(5):  # TorchScript's profiling executor optimizes on the first runs
                step()
            print("BARE " + json.dumps({"warm": words[1]}), flush=True)
            continue
        times, end = [], time.perf_counter() + float(duration)
        while time.perf_counter() < end:
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        print("BARE " + json.dumps({"phase": words[1], "n": n, "times": sorted(times)}), flush=True)


# ---- the driver (in serve.py's process) ---------------------------------------------------------
class BareProcess:
    """One benchmarks/_bare.py process, driven line by line so several can measure at the same time."""

    def __init__(self, work: Path, threads: int, duration: float) -> None:
        cmd = [sys.executable, __file__, str(work / "resnet34.pt"), str(KITTEN)]
        cmd += [str(work / "tiny.pt"), str(threads), str(duration)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("BARE "):
                self._lines.put(line[5:])

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, timeout_s: float) -> dict:
        try:
            return json.loads(self._lines.get(timeout=timeout_s))
        except queue.Empty:
            raise RuntimeError(f"bare model process {self.proc.pid} silent for {timeout_s:.0f} s") from None

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.send("quit")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def measure_bare(group: list[BareProcess], phase: str, duration: float, unit: str) -> dict:
    """Warm every process of the group, then run them at the same moment: throughput summed, latency
    percentiles over every step of every process."""
    for bare in group:
        bare.send(f"warm {phase}")
    for bare in group:
        bare.expect(300)
    for bare in group:
        bare.send(f"run {phase}")
    runs = [bare.expect(duration * 5 + 120) for bare in group]
    times = sorted(t for run in runs for t in run["times"])
    return {
        unit: sum(run["n"] * len(run["times"]) / sum(run["times"]) for run in runs),
        "p50_ms": 1000 * times[len(times) // 2],
        "p99_ms": 1000 * times[min(len(times) - 1, int(len(times) * 0.99))],
    }


def in_flight(group: list[BareProcess], batch: int, duration: float, batched: dict) -> dict:
    """The bare shape with ``batch`` images in flight in all (``batch / processes`` each), as many as
    ``batch`` clients keep in a server: for one process that is ``batched`` itself."""
    if len(group) == 1 or batch % len(group):
        return batched
    return measure_bare(group, f"batch{batch // len(group)}", duration, "img_per_s")


def run_bare(
    work: Path,
    processes: int,
    threads: int,
    duration: float,
    batch: int,
    tiny_batch: int | None,
    memory: bool = True,
) -> dict:
    return run_group(
        [BareProcess(work, threads, duration) for _ in range(processes)], duration, batch, tiny_batch, memory
    )


def run_group(
    group: list[BareProcess], duration: float, batch: int, tiny_batch: int | None = None, memory: bool = True
) -> dict:
    """Measure started bare processes (this module's, or any driven the same way): batch 1, the batched
    run, the tiny model when ``tiny_batch`` is given, then memory (unless ``memory`` is false); every
    process is closed after."""
    try:
        for bare in group:
            bare.expect(300)  # loaded
        out = {
            # c=1: one request in flight, so one process works and the others wait.
            "batch1": measure_bare(group[:1], "batch1", duration, "img_per_s"),
            "batched": measure_bare(group, f"batch{batch}", duration, "img_per_s"),
        }
        # "batched" keeps a batch in every process: 2 x batch 8 is 16 images in flight, twice what
        # 8 clients have. The same 8 split across the processes (2 x 4) is the like-for-like limit.
        out["in_flight"] = in_flight(group, batch, duration, out["batched"])
        if tiny_batch is not None:
            out["tiny"] = measure_bare(group, f"tiny{tiny_batch}", duration, "req_per_s")
        if not memory:
            return out
        # Memory in a batched run of its own: reading memory maps costs CPU the timed runs must not pay.
        with MemorySampler(lambda: [(f"process {i + 1}", b.proc.pid) for i, b in enumerate(group)]) as mem:
            measure_bare(group, f"batch{batch}", min(5.0, duration), "img_per_s")
        return {**out, "memory": mem.result()}
    finally:
        for bare in group:
            bare.close()


if __name__ == "__main__":
    child()
