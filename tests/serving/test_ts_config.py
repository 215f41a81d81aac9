"""serve --ts-config: a TorchServe config.properties, as TorchServe's docs write one, served unchanged."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from archiver.errors import UsageError
from archiver.ts_config import read_ts_config
from archiver.ts_properties import parse_properties

CLI = [sys.executable, "-m", "archiver"]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def mar(folder: Path, store: Path) -> Path:
    """The folder archive zipped into STORE/NAME.mar, as TorchServe's model store holds them."""
    store.mkdir(exist_ok=True)
    made = shutil.make_archive(str(store / folder.name), "zip", folder)
    return Path(made).rename(store / f"{folder.name}.mar")


# The shape of TorchServe's docs/configuration.md examples: addresses, the model store and the models to
# load, workers and the queue, JVM and Netty keys that mean nothing here, a ':' separator, '!' and '#'
# comments, and the per-model JSON carried over lines by trailing backslashes.
CONFIG = """\
# TorchServe config.properties
inference_address=http://127.0.0.1:{inference}
management_address=http://127.0.0.1:{management}
metrics_address=http://127.0.0.1:{metrics}
! Netty and the JVM
number_of_netty_threads=32
vmargs=-Xmx1g -XX:+ExitOnOutOfMemoryError
model_store={store}
load_models=noop=noop.mar,echo.mar
default_workers_per_model=2
job_queue_size : 7
model_snapshot_typo=true
models={{\\
  "noop": {{\\
    "1.0": {{\\
        "defaultVersion": true,\\
        "marName": "noop.mar",\\
        "minWorkers": 1,\\
        "maxWorkers": 1,\\
        "batchSize": 4,\\
        "maxBatchDelay": 100,\\
        "responseTimeout": 120\\
    }}\\
  }}\\
}}
"""


def test_a_torchserve_config_properties_is_served_with_its_ports_models_workers_and_queue(
    tmp_path, make_model, call, poll
):
    store = tmp_path / "model_store"
    mar(make_model("noop"), store)
    mar(make_model("echo"), store)
    inference, management, metrics, metrics_flag = free_ports(4)
    config = tmp_path / "config.properties"
    config.write_text(CONFIG.format(inference=inference, management=management, metrics=metrics, store=store))
    ready_file, log = tmp_path / "ready.json", tmp_path / "serve.log"
    cmd = [*CLI, "serve", "--ts-config", str(config), "--metrics-port", str(metrics_flag)]
    cmd += ["--ready-file", str(ready_file), "--cache-dir", str(tmp_path / "cache")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env())
    try:
        poll(lambda: ready_file.exists() or proc.poll() is not None, timeout=90, what="server ready")
        assert proc.poll() is None, log.read_text()
        ready = json.loads(ready_file.read_text())
        # the file's ports, except the one the command line gave
        assert (ready["inference_port"], ready["management_port"]) == (inference, management)
        assert ready["metrics_port"] == metrics_flag
        assert ready["models"] == {"noop": "READY", "echo": "READY"}

        answer = call("POST", f"http://127.0.0.1:{inference}/predictions/noop", b"hi")
        assert answer.status == 200 and answer.json()["echo"] == "hi"
        noop = call("GET", f"http://127.0.0.1:{management}/models/noop").json()[0]
        echo = call("GET", f"http://127.0.0.1:{management}/models/echo").json()[0]
        # models= JSON for noop (its minWorkers beats default_workers_per_model), the defaults for echo
        assert (noop["batchSize"], noop["maxBatchDelay"], noop["minWorkers"]) == (4, 100, 1)
        assert (echo["batchSize"], echo["minWorkers"]) == (1, 2)
        assert len(echo["workers"]) == 2
        assert echo["jobQueueStatus"]["remainingCapacity"] == 7
    finally:
        proc.terminate()
        proc.wait(30)
    text = log.read_text()
    for line in (
        "config.properties: ignoring number_of_netty_threads (line 6): Netty's threads",
        "config.properties: ignoring vmargs (line 7): the JVM's options",
        "config.properties: ignoring model_snapshot_typo (line 12): not a TorchServe 0.12 setting",
        "config.properties: ignoring models' maxWorkers (line 13): a model runs the workers it is given",
        "config.properties: ignoring models' marName (line 13): load_models (or --models) names",
    ):
        assert line in text, text


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "job_queue_size=many",
            "job_queue_size (line 2 of config.properties) must be an integer, got 'many'",
        ),
        (
            "default_workers_per_model=100000",
            "default_workers_per_model (line 2 of config.properties) must be an integer from 0 to 4096",
        ),
        ("inference_address=https://127.0.0.1:8443", "inference_address (line 2 of config.properties) asks"),
        ("metrics_mode=statsd", "metrics_mode (line 2 of config.properties) must be one of log, prometheus"),
        ("install_py_dep_per_model=yes", "install_py_dep_per_model (line 2 of config.properties) must be"),
        ('models={"m": {"1.0": {"batchSize": 5000}}}', "models (line 2 of config.properties): m 1.0"),
        ("metrics_config=/nonexistent/metrics.yaml", "metrics_config (line 2 of config.properties): cannot"),
        ("model_store=$$ARCHIVER_TEST_UNSET_VARIABLE$$", "line 2: model_store uses $$ARCHIVER_TEST_UNSET"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key_and_its_line_and_exits_2(tmp_path, echo_model, line, message):
    config = tmp_path / "config.properties"
    config.write_text(f"# first line\n{line}\n")
    result = subprocess.run(
        [*CLI, "serve", str(echo_model), "--ts-config", str(config), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert result.returncode == 2, result.stderr
    (error,) = result.stderr.strip().splitlines()
    assert message in error
    assert "Traceback" not in result.stderr


def test_two_hosts_in_the_addresses_are_refused_rather_than_exposing_one_api(tmp_path):
    config = tmp_path / "config.properties"
    config.write_text("inference_address=http://0.0.0.0:8080\nmanagement_address=http://127.0.0.1:8081\n")
    with pytest.raises(UsageError, match="name different hosts"):
        read_ts_config(config)


def test_java_properties_syntax_as_java_reads_it():
    text = (
        "# comment\n"
        "   ! another comment\n"
        "a=1\n"
        "b : two words  \n"
        "c three\n"
        "d=first\\\n"
        "    second\n"
        "e=tab\\there\\u00e9\\=\\\\\n"
        "key\\ with\\ spaces=x\n"
        "a=overridden\n"
        "empty=\n"
        "ends_in_backslash=\\\\\n"
    )
    props = parse_properties(text)
    assert {k: p.value for k, p in props.items()} == {
        "a": "overridden",
        "b": "two words  ",
        "c": "three",
        "d": "firstsecond",
        "e": "tab\there\u00e9=\\",
        "key with spaces": "x",
        "empty": "",
        "ends_in_backslash": "\\",
    }
    assert props["d"].line == 6 and props["a"].line == 10


def test_flags_and_config_over_the_file_and_the_file_under_the_archive_s_model_config(tmp_path):
    config = tmp_path / "config.properties"
    config.write_text(
        "default_workers_per_model=3\ndefault_response_timeout=30\nmax_request_size=1000\n"
        "install_py_dep_per_model=true\nnumber_of_gpu=0\ndisable_token_authorization=true\n"
        "grpc_inference_port=17070\nmetrics_mode=log\nenable_metrics_api=true\nlimit_max_image_pixels=false\n"
    )
    ts = read_ts_config(config, {"grpc_port"})
    assert ts.defaults == {"workers": 3, "response_timeout_s": 30}  # under model-config.yaml
    assert ts.server == {
        "max_request_size": 1000,
        "install_model_deps": True,
        "number_of_gpu": 0,
        "no_auth": True,
        "grpc_port": 17070,
    }
    assert ts.notes == [  # enable_metrics_api=true asks for what happens anyway: not reported
        "config.properties: ignoring limit_max_image_pixels (line 10): PIL's pixel limit stays on (it guards "
        "the workers' memory)",
        "config.properties: ignoring metrics_mode (line 8): no metric log files are written; "
        "/metrics serves TorchServe's names",
    ]


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "MODEL_ARCHIVER_TOKEN": ""}


def test_environment_placeholders_are_torchserve_s_double_dollar_ones(monkeypatch):
    monkeypatch.setenv("TS_TEST_PORT", "8123")
    text = "inference_address=http://127.0.0.1:$$TS_TEST_PORT$$\nprice=a$b ${TS_TEST_PORT}\n"
    props = parse_properties(text)
    assert props["inference_address"].value == "http://127.0.0.1:8123"
    assert props["price"].value == "a$b ${TS_TEST_PORT}"  # only $$NAME$$ is TorchServe's syntax
