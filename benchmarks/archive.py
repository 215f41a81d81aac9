"""Benchmark: archive a 1 GiB weights file with model-archiver, cp and torch-model-archiver; ratios to cp.

Run from the project root:  .venv/bin/python benchmarks/archive.py [--size-mib 1024] [--repeat 3]

model-archiver fsyncs the archive before renaming it into place, so its fair yardstick is ``cp``
followed by ``sync`` of the copy; the target (issue 15) is archiving within 1.5x of that.

The weights are float32 values drawn from a normal distribution (like trained weights: deflate saves
only a few percent on them). Every command runs as a subprocess, interpreter start-up included, with the
input in the page cache; the median of --repeat runs is reported, with the median CPU time (user +
system, every thread) beside it: on two cores, archiving's floor is about
half its CPU time. Output lands in bench-out/ (ignored).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_X_CP_SYNC = 1.5
BIN = Path(sys.executable).parent


def make_weights(path: Path, size_mib: int) -> None:
    if path.exists() and path.stat().st_size == size_mib << 20:
        return
    import torch

    generator = torch.Generator().manual_seed(0)
    with open(path, "wb") as fh:
        for _ in range(size_mib):
            fh.write(torch.randn(1 << 18, generator=generator).numpy().tobytes())


def timed(cmd: list[str], cwd: Path, before=None) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, all threads) of one run of ``cmd``."""
    if before is not None:
        before()
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(cmd)}\n{proc.stderr}")
    return elapsed, (after.ru_utime - used.ru_utime) + (after.ru_stime - used.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="weights file size (default 1024 = 1 GiB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per command; the median is reported")
    parser.add_argument(
        "--skip-torch-model-archiver", action="store_true", help="only cp, cp + sync and model-archiver"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "archive", help="work folder")
    args = parser.parse_args()

    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    weights = work / "weights.pt"
    print(f"preparing {args.size_mib} MiB of float32 weights in {weights} ...", flush=True)
    make_weights(weights, args.size_mib)
    (work / "handler.py").write_text("def handle(data, context):\n    return data\n")
    (work / "index_to_name.json").write_text('{"0": "cat"}\n')
    subprocess.run(["cat", str(weights)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache

    store = work / "store"

    def fresh_store() -> None:
        shutil.rmtree(store, ignore_errors=True)
        store.mkdir()

    common = [
        "--model-name",
        "bench",
        "-v",
        "1.0",
        "--handler",
        "handler.py",
        "--serialized-file",
        "weights.pt",
    ]
    common += ["--extra-files", "index_to_name.json", "--export-path", "store", "-f"]
    commands = {
        "cp": ["cp", "weights.pt", "store/copy.pt"],
        "cp + sync": ["sh", "-c", "cp weights.pt store/copy.pt && sync store/copy.pt"],
        "model-archiver (default)": [str(BIN / "model-archiver"), *common],
        "model-archiver verify": [],  # checks the archive the line above wrote
        "torch-model-archiver (default)": [str(BIN / "torch-model-archiver"), *common],
        "torch-model-archiver (zip-store)": [
            str(BIN / "torch-model-archiver"),
            *common,
            "--archive-format",
            "zip-store",
        ],
    }
    if args.skip_torch_model_archiver or not (BIN / "torch-model-archiver").exists():
        print("torch-model-archiver rows skipped (--skip-torch-model-archiver, or not installed)")
        commands = {k: v for k, v in commands.items() if not k.startswith("torch-model-archiver")}

    results: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for label, cmd in commands.items():
        runs, cpus = [], []
        for _ in range(args.repeat):
            if not cmd:
                wall, used = timed([str(BIN / "model-archiver"), "verify", "store/bench.mar"], work)
            else:
                wall, used = timed(cmd, work, before=fresh_store)
            runs.append(wall)
            cpus.append(used)
        results[label], cpu[label] = statistics.median(runs), statistics.median(cpus)
        print(
            f"  {label:<34} {results[label]:7.2f} s  (runs: {', '.join(f'{r:.2f}' for r in runs)};"
            f" CPU {cpu[label]:.2f} s)",
            flush=True,
        )

    base = results["cp"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print()
    python = platform.python_version()
    print(f"{args.size_mib} MiB weights, {os.cpu_count()} CPUs, Python {python}, load average {load:.2f}")
    print(f"| command | seconds (median of {args.repeat}) | × cp | CPU seconds, all threads |")
    print("| --- | ---: | ---: | ---: |")
    for label, seconds in results.items():
        print(f"| {label} | {seconds:.2f} | {seconds / base:.1f} | {cpu[label]:.2f} |")
    ours, synced = results["model-archiver (default)"], results["cp + sync"]
    verdict = "met" if ours <= TARGET_X_CP_SYNC * synced else "MISSED"
    print()
    print(
        f"TARGET archiving {args.size_mib} MiB <= {TARGET_X_CP_SYNC}x cp + sync: "
        f"model-archiver {ours:.2f} s, cp + sync {synced:.2f} s = {ours / synced:.2f}x: {verdict}"
    )


if __name__ == "__main__":
    main()
