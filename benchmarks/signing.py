"""Benchmark: what signing costs. Sign and verify a 1 GiB archive against `sha256sum` of it, and the
start-up time a signed model adds to `serve` (a 1 GiB archive and a tiny one).

Run from the project root:  .venv/bin/python benchmarks/signing.py [--size-mib 1024] [--repeat 1]

Every command runs as a subprocess, interpreter start-up included, with the archive in the page cache
(it is read once first). ``verify (signature)`` is the check a server runs (the library's ``verify``);
the ``verify`` command also re-hashes every file against the manifest. Start-up is from the process's
start to its --ready-file (the model READY), with a fresh unpack cache each run, without and with
``--trusted-key``. The median of --repeat runs is reported. Output lands in bench-out/signing/.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import stop_server, wait_ready_file  # noqa: E402

HANDLER = "def handle(data, context):\n    return None if not data else [len(data)] * len(data)\n"


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of the command and its threads)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def build(out: Path, name: str, size_mib: int, key: Path) -> Path:
    """A zip-store .mar holding ``size_mib`` MiB of random weights (stored: its size is the weights')."""
    src = out / f"src-{name}"
    src.mkdir(exist_ok=True)
    (src / "handler.py").write_text(HANDLER)
    weights = src / "weights.bin"
    if not weights.exists() or weights.stat().st_size != size_mib << 20:
        with open(weights, "wb") as stream:
            for _ in range(size_mib):
                stream.write(os.urandom(1 << 20))
    cmd = [
        str(BIN / "model-archiver"),
        "--model-name",
        name,
        "-v",
        "1.0",
        "--handler",
        str(src / "handler.py"),
    ]
    cmd += ["--extra-files", str(weights), "--archive-format", "zip-store", "--export-path", str(out), "-f"]
    cmd += ["--sign-key", str(key)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out / f"{name}.mar"


def keys(out: Path) -> tuple[Path, Path]:
    private, public = out / "key.pem", out / "key.pub"
    if not public.exists():
        subprocess.run(
            ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(private)],
            check=True,
        )
        subprocess.run(
            ["openssl", "ec", "-in", str(private), "-pubout", "-out", str(public)],
            check=True,
            capture_output=True,
        )
    return private, public


def start_up(out: Path, mar: Path, trusted: Path | None, run: int) -> float:
    """Seconds from `serve` starting to its model READY (fresh unpack cache)."""
    ready = out / f"ready-{run}.json"
    ready.unlink(missing_ok=True)
    cache = out / f"cache-{run}"
    cmd = [str(BIN / "model-archiver"), "serve", str(mar), "--port", "0", "--management-port", "0"]
    cmd += ["--metrics-port", "0", "--ready-file", str(ready), "--cache-dir", str(cache)]
    cmd += ["--trusted-key", str(trusted)] if trusted else []
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        state = wait_ready_file(ready, proc)
        elapsed = time.perf_counter() - started
    finally:
        stop_server(proc)
        subprocess.run(["rm", "-rf", str(cache)], check=True)
    if set(state["models"].values()) != {"READY"}:
        raise RuntimeError(f"the model did not load: {state['models']}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    out = ROOT / "bench-out" / "signing"
    out.mkdir(parents=True, exist_ok=True)
    private, public = keys(out)
    big = build(out, "big", args.size_mib, private)
    tiny = build(out, "tiny", 0, private)
    big.read_bytes()  # into the page cache, for every contender alike
    mib = big.stat().st_size / (1 << 20)

    verify_api = [sys.executable, "-c", "import sys; from archiver.signing import verify; "
                  "from archiver.signing_keys import read_trusted_keys; "
                  "verify(sys.argv[1], read_trusted_keys([sys.argv[2]]))", str(big), str(public)]  # fmt: skip
    archiver = str(BIN / "model-archiver")
    contenders = {
        "sha256sum": ["sha256sum", str(big)],
        "openssl dgst -sha256": ["openssl", "dgst", "-sha256", str(big)],
        "model-archiver sign": [archiver, "sign", str(big), "--private-key", str(private)],
        "verify (signature)": verify_api,
        "model-archiver verify --public-key": [archiver, "verify", str(big), "--public-key", str(public)],
        "model_signing verify key": [str(BIN / "model_signing"), "verify", "key", str(big), "--signature",
                                     f"{big}.sig", "--public_key", str(public)],
    }  # fmt: skip
    runs = {name: [timed(cmd) for _ in range(args.repeat)] for name, cmd in contenders.items()}
    wall = {name: statistics.median(w for w, _ in r) for name, r in runs.items()}
    cpu = {name: statistics.median(c for _, c in r) for name, r in runs.items()}
    load = os.getloadavg()[0]
    print(f"{mib:.0f} MiB archive, median of {args.repeat} run(s), {os.cpu_count()} cores, load {load:.1f}:")
    print(f"  {'':<36} {'wall':>7}  {'x sha256sum':>11}  {'CPU':>7}  {'x sha256sum':>11}")
    for name in runs:
        print(
            f"  {name:<36} {wall[name]:6.2f}s  {wall[name] / wall['sha256sum']:10.2f}x  "
            f"{cpu[name]:6.2f}s  {cpu[name] / cpu['sha256sum']:10.2f}x"
        )

    print("serve start-up to READY (fresh unpack cache):")
    for label, mar in ((f"{mib:.0f} MiB archive", big), ("tiny archive", tiny)):
        plain = statistics.median(start_up(out, mar, None, i) for i in range(args.repeat))
        signed = statistics.median(start_up(out, mar, public, i) for i in range(args.repeat))
        print(f"  {label:<18} unsigned {plain:6.2f} s  --trusted-key {signed:6.2f} s  "
              f"added {signed - plain:+.2f} s ({signed / plain:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
