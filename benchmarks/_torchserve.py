"""TorchServe 0.12 started at its best documented CPU configuration, so that no comparison catches the
peer at its worst: registered through its management API with the batch settings, per-request logging
off, warm-up left to the caller, isolated from any other TorchServe on the machine, stopped afterwards.

What "its best" means here, each from TorchServe 0.12's own documentation:
- docs/logging.md "Enable asynchronous logging": ``async_logging=true`` ("if your model is super
  lightweight and you want high throughput"), and a ``--log-config`` log4j2 file: the shipped one writes
  about ten lines per request at DEBUG (access log, TS_METRICS, the worker's timings) synchronously to
  files; ours keeps warnings and errors only, as our server logs no line per request either.
- docs/performance_guide.md: ``batch_size``/``max_batch_delay`` first, then the number of workers; on CPU
  ``cpu_launcher_enable`` with core pinning (``Setup(cpu_launcher=True)``).
- docs/configuration.md "Other properties": ``number_of_netty_threads``, ``netty_client_threads``
  (default: the JVM's cores) and ``job_queue_size`` (default 100, raised so c=32 never queues out).
- Its workers' torch threads follow ``OMP_NUM_THREADS`` from its environment (it sets none itself).
Several setups can be measured and the best kept: see ``SETUPS``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
from _common import REPO, free_port, kill_leftovers

TS_VENV = REPO / ".venv-ts"

QUIET_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<!-- TorchServe with no line per request: warnings and errors only, to one file. -->
<Configuration>
  <Appenders>
    <RollingFile name="ts_log" fileName="${env:LOG_LOCATION:-logs}/ts_log.log"
                 filePattern="${env:LOG_LOCATION:-logs}/ts_log.%i.log">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
      <Policies><SizeBasedTriggeringPolicy size="100 MB"/></Policies>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="off"/>
    <Logger name="TS_METRICS" level="off"/>
    <Logger name="MODEL_METRICS" level="off"/>
    <Logger name="MODEL_LOG" level="warn"/>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Logger name="org.pytorch.serve" level="warn"/>
    <Root level="warn"><AppenderRef ref="ts_log"/></Root>
  </Loggers>
</Configuration>
"""


@dataclasses.dataclass(frozen=True)
class Setup:
    """One TorchServe configuration; ``describe()`` spells it out for the report."""

    label: str = "torchserve"
    workers: int = 1
    threads: int | None = None  # OMP_NUM_THREADS for its workers; None: torch's default (all cores)
    netty_threads: int | None = None  # number_of_netty_threads and netty_client_threads; None: cores
    quiet_logs: bool = True  # async_logging=true and the log4j2 file above
    cpu_launcher: bool = False  # cpu_launcher_enable=true, --use_logical_core (core pinning)

    def describe(self, batch: int, delay_ms: int) -> str:
        parts = [
            f"registered via POST /models (batch_size={batch}, max_batch_delay={delay_ms}, "
            f"initial_workers={self.workers})",
            f"OMP_NUM_THREADS={self.threads}" if self.threads else "torch threads: default (all cores)",
            f"netty threads {self.netty_threads}" if self.netty_threads else "netty threads: default (cores)",
            "async_logging=true + no per-request log lines" if self.quiet_logs else "shipped log4j2 (DEBUG)",
            "job_queue_size=1000",
        ]
        if self.cpu_launcher:
            parts.append("cpu_launcher_enable=true --use_logical_core")
        return f"{self.label}: " + ", ".join(parts)


# The candidates measured when a benchmark asks for "the best": each a documented knob that can matter
# on a small CPU machine. The default benchmark runs keep the first; --ts-setups picks others.
SETUPS = {
    "best": Setup("torchserve"),
    "netty1": Setup("torchserve-netty1", netty_threads=1),
    "2workers": Setup("torchserve-2w", workers=2, threads=1),
    "launcher": Setup("torchserve-launcher", workers=2, cpu_launcher=True),
    "shipped-logs": Setup("torchserve-shipped-logs", quiet_logs=False),
}


def available() -> bool:
    return (TS_VENV / "bin" / "torchserve").exists() and shutil.which("java") is not None


@dataclasses.dataclass
class Running:
    url: str  # the model's prediction URL
    management: str
    java: psutil.Process
    description: str


def _properties(setup: Setup, ports: list[int], home: Path) -> str:
    lines = [
        f"inference_address=http://127.0.0.1:{ports[0]}",
        f"management_address=http://127.0.0.1:{ports[1]}",
        f"metrics_address=http://127.0.0.1:{ports[2]}",
        # Its workers' unix sockets are named after this number, in its own temp folder (see _env).
        f"initial_worker_port={ports[3]}",
        # Its gRPC ports default to 7070/7071: another server on the machine may hold them.
        f"grpc_inference_port={ports[4]}",
        f"grpc_management_port={ports[5]}",
        "disable_token_authorization=true",
        "enable_model_api=true",
        f"python={TS_VENV / 'bin' / 'python'}",
        "job_queue_size=1000",
        "disable_system_metrics=true",
    ]
    if setup.quiet_logs:
        lines.append("async_logging=true")
    if setup.netty_threads:
        lines += [
            f"number_of_netty_threads={setup.netty_threads}",
            f"netty_client_threads={setup.netty_threads}",
        ]
    if setup.cpu_launcher:
        lines += ["cpu_launcher_enable=true", "cpu_launcher_args=--use_logical_core"]
    return "\n".join(lines) + "\n"


def _env(setup: Setup, home: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": f"{TS_VENV / 'bin'}:{os.environ['PATH']}",
        "TS_DISABLE_SYSTEM_METRICS": "true",
    }
    # Its pid file (.model_server.pid) and worker sockets live in the temp folder: one per instance, so
    # starting or stopping this one never touches another TorchServe on the machine.
    env["TMPDIR"] = env["TEMP"] = str(home / "tmp")
    env.pop("OMP_NUM_THREADS", None)
    if setup.threads:
        env["OMP_NUM_THREADS"] = str(setup.threads)
    return env


def _call(url: str, method: str = "GET", timeout: float = 10.0) -> tuple[int, bytes]:
    """One HTTP call with a timeout (TorchServe keeps requests open when its workers fail)."""
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def find_java(home: Path) -> psutil.Process | None:
    """The Java frontend started in ``home`` (not anyone else's TorchServe)."""
    for p in psutil.process_iter(["cmdline", "cwd"]):
        cmdline = p.info["cmdline"] or []
        if p.info["cwd"] == str(home) and any("org.pytorch.serve.ModelServer" in c for c in cmdline):
            return p
    return None


@contextlib.contextmanager
def started(
    setup: Setup, mar: Path, home: Path, batch: int, delay_ms: int, limit_s: float = 180
) -> Iterator[Running]:
    """TorchServe serving ``mar`` (registered under its archive's name) from a fresh ``home``: ready to
    answer when the block starts (not yet warm: the caller warms it), stopped with every process it
    started when the block ends, whatever happened."""
    ports = [free_port() for _ in range(6)]
    shutil.rmtree(home, ignore_errors=True)
    (home / "tmp").mkdir(parents=True)
    (home / "config.properties").write_text(_properties(setup, ports, home))
    cmd = [str(TS_VENV / "bin" / "torchserve"), "--start", "--ncs", "--model-store", str(mar.parent)]
    cmd += ["--ts-config", str(home / "config.properties"), "--disable-token-auth"]
    if setup.quiet_logs:
        (home / "log4j2.xml").write_text(QUIET_LOG4J2)
        cmd += ["--log-config", str(home / "log4j2.xml")]
    env = _env(setup, home)
    java = None
    try:
        # The launcher leaves Java running with its stdout: a pipe here would never reach EOF.
        with open(home / "torchserve-start.log", "w") as log:
            subprocess.run(
                cmd, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=120, check=True
            )
        management = f"http://127.0.0.1:{ports[1]}"
        deadline = time.monotonic() + limit_s
        while _call(f"http://127.0.0.1:{ports[0]}/ping", timeout=5)[0] != 200:
            java = java or find_java(home)
            if java is not None and not java.is_running():
                raise RuntimeError(f"TorchServe exited while starting (see {home}/torchserve-start.log)")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"TorchServe did not answer /ping within {limit_s:.0f} s (see {home}/logs)"
                )
            time.sleep(0.2)
        java = java or find_java(home)
        query = urllib.parse.urlencode(
            {
                "url": mar.name,
                "batch_size": batch,
                "max_batch_delay": delay_ms,
                "initial_workers": setup.workers,
                "synchronous": "true",
            }
        )
        status, body = _call(f"{management}/models?{query}", "POST", timeout=limit_s)
        if status != 200:
            raise RuntimeError(f"TorchServe refused to register {mar.name}: {status} {body[:300]!r}")
        name = mar.stem
        if java is None:
            raise RuntimeError("TorchServe answers but its Java process was not found")
        yield Running(
            f"http://127.0.0.1:{ports[0]}/predictions/{name}",
            management,
            java,
            setup.describe(batch, delay_ms),
        )
    finally:
        java = java or find_java(home)
        tree = [java, *java.children(recursive=True)] if java is not None else []
        for proc in tree[:1]:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        kill_leftovers(tree, grace_s=30)  # its workers can outlive a frontend stopped mid-start


def worker_role(proc: psutil.Process) -> str:
    return "worker" if "model_service_worker" in " ".join(proc.cmdline()) else proc.name()
