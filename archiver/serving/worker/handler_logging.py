"""A handler's ``logging`` lines in the server's log, as TorchServe's model_log has them.

A worker's stdout and stderr are read by the server and logged line by line with the worker's prefix
(``supervisor/worker_output.py``); Python's logging, left unconfigured, drops INFO and DEBUG. So the
worker sends records to those pipes, one line each: INFO and DEBUG to stdout, WARNING and up to
stderr (where the lines that explain a worker's death are kept). The level is INFO, TorchServe's;
``MODEL_ARCHIVER_HANDLER_LOG_LEVEL`` (DEBUG, INFO, WARNING, ERROR) changes it.
"""

from __future__ import annotations

import logging
import os
import sys

LEVEL_VARIABLE = "MODEL_ARCHIVER_HANDLER_LOG_LEVEL"
_FORMAT = "%(levelname)s %(name)s: %(message)s"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _Below(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def configure_handler_logging() -> str:
    """Route the worker's log records to its stdout/stderr; the level used, by name."""
    wanted = os.environ.get(LEVEL_VARIABLE, "INFO").strip().upper()
    level_name = wanted if wanted in _LEVELS else "INFO"
    formatter = logging.Formatter(_FORMAT)
    quiet = logging.StreamHandler(sys.stdout)
    quiet.addFilter(_Below(logging.WARNING))
    loud = logging.StreamHandler(sys.stderr)
    loud.setLevel(logging.WARNING)
    for handler in (quiet, loud):
        handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(quiet)
    root.addHandler(loud)
    root.setLevel(level_name)
    if wanted != level_name:
        logging.getLogger(__name__).warning("%s=%r is not a log level; using INFO", LEVEL_VARIABLE, wanted)
    return level_name
