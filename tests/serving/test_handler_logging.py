"""A worker's log records go to its pipes (INFO and DEBUG to stdout, WARNING up to stderr), at INFO unless
MODEL_ARCHIVER_HANDLER_LOG_LEVEL says otherwise: the server logs both pipes with the worker's prefix."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import logging
from archiver.serving.worker.handler_logging import configure_handler_logging

print("level", configure_handler_logging())
log = logging.getLogger("my_handler")
log.debug("a debug line")
log.info("an info line")
log.warning("a warning line")
"""


def run_worker_logging(level: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MODEL_ARCHIVER_HANDLER_LOG_LEVEL"}
    if level is not None:
        env["MODEL_ARCHIVER_HANDLER_LOG_LEVEL"] = level
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=60, check=True
    )


def test_info_lines_reach_stdout_and_warnings_stderr_by_default():
    done = run_worker_logging(None)
    assert done.stdout.splitlines() == ["level INFO", "INFO my_handler: an info line"]
    assert done.stderr.splitlines() == ["WARNING my_handler: a warning line"]


def test_the_level_can_be_lowered_and_a_wrong_one_is_named():
    assert "DEBUG my_handler: a debug line" in run_worker_logging("debug").stdout
    wrong = run_worker_logging("chatty")
    assert "level INFO" in wrong.stdout
    assert "MODEL_ARCHIVER_HANDLER_LOG_LEVEL='CHATTY' is not a log level; using INFO" in wrong.stderr
