"""The same ranges on the command line, in --config and in an archive's model-config.yaml: a value out
of range is refused before anything starts, in one line that names the setting as it was given and the
range (exit 2), by the one checker the management API uses (issue 19, item 4)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from archiver import settings_bounds
from archiver.cli import cli
from archiver.config import parse_model_config
from archiver.errors import ConfigError, UsageError

CLI = [sys.executable, "-m", "archiver"]
TOP = settings_bounds.default_max_workers_per_model()


def serve(*args: str) -> object:
    """``model-archiver serve ARGS`` through click; the error it raised (None if it returned)."""
    result = CliRunner().invoke(cli, ["serve", *args])
    return result.exception


TIMEOUT = "a number > 0 and <= 86400 (seconds)"
WORKERS = f"an integer from 0 to {TOP}"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--workers", "-3"], f"--workers must be {WORKERS}, got -3"),
        (["--workers", "1000000"], f"--workers must be {WORKERS}, got 1000000 (at most --max-workers"),
        (["--workers", "3", "--max-workers-per-model", "2"], "--workers must be an integer from 0 to 2"),
        (["--max-workers-per-model", "0"], "--max-workers-per-model must be an integer from 1 to 4096"),
        (["--response-timeout", "nan"], f"--response-timeout must be {TIMEOUT}, got nan"),
        (["--response-timeout", "-1"], f"--response-timeout must be {TIMEOUT}, got -1"),
        (["--response-timeout", "inf"], f"--response-timeout must be {TIMEOUT}, got inf"),
        (["--worker-memory-limit", "-1"], "--worker-memory-limit must be 0 (no limit) or a number from 1 to"),
        (["--batch-size", "0"], "--batch-size must be an integer from 1 to 1024, got 0"),
        (["--max-batch-delay", "-5"], "--max-batch-delay must be a number from 0 to 60000 (milliseconds)"),
        (["--job-queue-size", "0"], "--job-queue-size must be an integer from 1 to 100000, got 0"),
        (["--max-request-items", "0"], "--max-request-items must be an integer from 1 to 65536, got 0"),
        (["--max-request-size", "0"], "--max-request-size must be an integer from 1 to 1073741824"),
        (["--port", "70000"], "--port must be an integer from 0 to 65535, got 70000"),
    ],
)
def test_a_flag_out_of_range_is_a_usage_error_naming_it_and_its_range(echo_model, flags, message):
    error = serve(str(echo_model), *flags)
    assert isinstance(error, UsageError) and error.exit_code == 2
    assert error.message.startswith(message), error.message


def test_a_flag_that_is_not_a_number_is_clicks_usage_error(echo_model):
    result = CliRunner().invoke(cli, ["serve", str(echo_model), "--workers", "lots"])
    assert result.exit_code == 2 and "'lots' is not a valid integer" in result.output


def test_the_config_file_is_checked_by_the_same_ranges_and_named_as_written(tmp_path, echo_model):
    config = tmp_path / "serve.yaml"
    for text, message in [
        ("workers: -3\n", f"workers in {config} must be an integer from 0 to {TOP}, got -3"),
        ("response_timeout: .nan\n", f"response_timeout in {config} must be a number > 0"),
        ("restart_backoff: 0\n", f"restart_backoff in {config} must be a number > 0 and <= 3600"),
        ("max_worker_deaths: 0\n", f"max_worker_deaths in {config} must be an integer from 1 to 1000"),
        ("worker_death_window: .inf\n", f"worker_death_window in {config} must be a number > 0"),
        ("torch_threads: 100000\n", f"torch_threads in {config} must be an integer from 1 to 1024"),
        ("max-workers-per-model: 2\nworkers: 3\n", f"workers in {config} must be an integer from 0 to 2"),
    ]:
        config.write_text(text)
        error = serve(str(echo_model), "--config", str(config))
        assert isinstance(error, UsageError), (text, error)
        assert error.message.startswith(message), error.message
    config.write_text("workers: 3\n")  # the flag wins over the file, and is what is checked
    assert serve(str(echo_model), "--config", str(config), "--workers", "-1").message.startswith("--workers")


def test_the_console_script_refuses_a_nan_timeout_in_one_line_with_exit_2(echo_model):
    env = {**os.environ, "MODEL_ARCHIVER_TOKEN": ""}
    result = subprocess.run(
        [*CLI, "serve", str(echo_model), "--response-timeout", "nan", "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "model-archiver: error: --response-timeout must be a number > 0 and <= 86400 (seconds), got nan"
    )


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("minWorkers: -3\n", "minWorkers must be an integer from 0 to 4096, got -3"),
        ("maxWorkers: 100000\n", "maxWorkers must be an integer from 0 to 4096, got 100000"),
        ("batchSize: 0\n", "batchSize must be an integer from 1 to 1024, got 0"),
        ("maxBatchDelay: .inf\n", "maxBatchDelay must be a number from 0 to 60000 (milliseconds), got inf"),
        ("responseTimeout: .nan\n", "responseTimeout must be a number > 0 and <= 86400 (seconds), got nan"),
        ("responseTimeout: -1\n", "responseTimeout must be a number > 0 and <= 86400 (seconds), got -1"),
        ("startupTimeout: 0\n", "startupTimeout must be a number > 0 and <= 86400 (seconds), got 0"),
        ("jobQueueSize: 0\n", "jobQueueSize must be an integer from 1 to 100000, got 0"),
        (
            "workerMemoryLimit: -1\n",
            "workerMemoryLimit must be 0 (no limit) or a number from 1 to 16777216 (MB), got -1",
        ),
        ("maxRetryTimeoutInSec: .nan\n", "maxRetryTimeoutInSec must be a finite number >= 0, got nan"),
    ],
)
def test_model_config_yaml_out_of_range_is_refused_naming_the_key(yaml_text, message):
    with pytest.raises(ConfigError) as caught:
        parse_model_config(yaml_text)
    assert caught.value.message == f"model-config.yaml: {message}"


def test_model_config_values_in_range_are_kept_and_a_memory_limit_of_0_means_none():
    config = parse_model_config("minWorkers: 2\nbatchSize: 8\nresponseTimeout: 30\nworkerMemoryLimit: 0\n")
    assert (config.min_workers, config.batch_size, config.response_timeout_s) == (2, 8, 30.0)
    assert config.worker_memory_limit_mb == 0  # the pool starts no memory watch for 0


@pytest.mark.parametrize(
    "text", ["", " ", "nan", "NaN", "inf", "-inf", "1e999", "abc", "0x10", "1" * 41, "None", "[1]"]
)
def test_query_text_that_is_no_number_in_range_is_refused(text):
    with pytest.raises(UsageError) as caught:
        settings_bounds.parse("response_timeout_s", text, "response_timeout")
    assert caught.value.message.startswith("response_timeout must be a number > 0 and <= 86400 (seconds)")


def test_the_default_worker_maximum_is_four_per_core_and_never_below_four():
    cores = len(os.sched_getaffinity(0))
    assert max(4, 4 * cores) == TOP
