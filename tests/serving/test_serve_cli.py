"""The ``serve`` and ``predict`` commands as a user runs them: real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from archiver.commands.serve import build_settings
from archiver.serving.front.server import ServerThread

CLI = [sys.executable, "-m", "archiver"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MODEL_ARCHIVER_TOKEN": ""}


def test_serve_prints_its_urls_and_models_and_drains_in_flight_requests_on_sigterm(
    serve_process, call, poll, echo_model, make_model
):
    broken = make_model("broken", handler_source="import missing_dependency_xyz\n")
    proc, ready = serve_process(str(echo_model), str(broken), "--workers", "1")
    base = f"http://127.0.0.1:{ready['inference_port']}"
    assert ready["models"] == {"broken": "FAILED", "echo": "READY"}
    assert call("POST", base + "/predictions/echo", b"hi").json()["echo"] == "hi"
    (worker_pid,) = ready["workers"]["echo"]
    assert worker_pid != proc.pid and os.path.exists(f"/proc/{worker_pid}")

    replies: list = []
    clients = [
        threading.Thread(
            target=lambda i=i: replies.append(call("POST", base + "/predictions/echo", f"sleep:0.{i}5"))
        )
        for i in range(4)
    ]
    for c in clients:
        c.start()
    metrics = f"http://127.0.0.1:{ready['metrics_port']}/metrics"
    poll(
        lambda: (
            'model_archiver_queue_depth{model="echo",version="1.0"} 3.0' in call("GET", metrics).body.decode()
        ),
        what="requests in flight",
    )
    proc.send_signal(signal.SIGTERM)
    for c in clients:
        c.join(30)
    proc.wait(30)
    out = proc.log.read_text()
    assert proc.returncode == 0, out
    assert sorted(r.status for r in replies) == [200, 200, 200, 200]
    assert f"inference http://127.0.0.1:{ready['inference_port']}" in out
    assert f"try a model in the browser at http://127.0.0.1:{ready['inference_port']}/ " in out
    assert f"echo 1.0: READY (workers 1: pid {worker_pid}; batch 1" in out
    assert not os.path.exists(f"/proc/{worker_pid}"), "the worker outlived its server"
    assert "broken 1.0: FAILED: " in out and "missing_dependency_xyz" in out
    assert "Traceback" not in out


def test_serve_refuses_a_public_address_without_a_token(echo_model):
    result = subprocess.run(
        [*CLI, "serve", str(echo_model), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert result.returncode == 2
    assert "set --token" in result.stderr and "--no-auth" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_settings_precedence_flags_over_config_file_over_model_config(tmp_path, make_model, call):
    model = make_model("configured", config_yaml="batchSize: 8\nmaxBatchDelay: 40\nminWorkers: 2\n")
    config = tmp_path / "serve.yaml"
    config.write_text("batch-size: 4\nport: 0\nmanagement_port: 0\nmetrics_port: 0\n")
    flags = {"batch_size": 2, "cache_dir": str(tmp_path / "cache")}

    def described(flag_values: dict, config_path: str | None) -> dict:
        settings = build_settings((str(model),), (), config_path, flag_values)
        settings.port = settings.management_port = settings.metrics_port = 0
        with ServerThread(settings) as server:
            return call("GET", server.url("management") + "/models/configured").json()[0]

    from_model = described({"cache_dir": flags["cache_dir"]}, None)
    assert (from_model["batchSize"], from_model["maxBatchDelay"], from_model["minWorkers"]) == (8, 40, 2)
    assert described({"cache_dir": flags["cache_dir"]}, str(config))["batchSize"] == 4
    assert described(flags, str(config))["batchSize"] == 2


def test_a_config_file_with_an_unknown_key_is_refused_in_one_line(tmp_path, echo_model):
    config = tmp_path / "serve.yaml"
    config.write_text("batchsize: 4\n")
    result = subprocess.run(
        [*CLI, "serve", str(echo_model), "--config", str(config)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert result.returncode == 1
    assert "unknown setting 'batchsize'" in result.stderr


def test_predict_prints_answers_as_json_and_exits_1_when_one_fails(tmp_path, echo_model):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("hello")
    bad.write_text("bad apple")
    cache = ["--cache-dir", str(tmp_path / "cache")]
    ok = subprocess.run(
        [*CLI, "predict", str(echo_model), str(good), *cache],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"echo": "hello", "batch": 1, "tag": "echo"}

    mixed = subprocess.run(
        [*CLI, "predict", str(echo_model), str(good), str(bad), "--json", '{"k": 1}', *cache],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert mixed.returncode == 1
    answers = json.loads(mixed.stdout)
    assert answers[0] == {"echo": "hello", "batch": 3, "tag": "echo"}
    assert answers[1] == {"code": 400, "type": "HandlerInputError", "message": "cannot use 'bad apple'"}
    assert answers[2]["echo"] == '{"k": 1}'


def test_predict_on_a_broken_archive_fails_in_one_line(tmp_path, make_model):
    broken = make_model("broken", handler_source="def nothing_here():\n    pass\n")
    (tmp_path / "in.txt").write_text("x")
    result = subprocess.run(
        [*CLI, "predict", str(broken), str(tmp_path / "in.txt"), "--cache-dir", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("model-archiver: error: ") and "Traceback" not in result.stderr


def test_the_library_form_loads_and_predicts(tmp_path, echo_model):
    from archiver.serving import load_model

    model = load_model(Path(echo_model), cache_dir=tmp_path / "cache")
    try:
        assert model.predict([b"a", "b", {"c": 1}]) == [
            {"echo": "a", "batch": 3, "tag": "echo"},
            {"echo": "b", "batch": 3, "tag": "echo"},
            {"echo": '{"c": 1}', "batch": 3, "tag": "echo"},
        ]
    finally:
        model.close()


def test_the_worker_settings_come_from_flags_and_the_config_file(tmp_path, echo_model):
    config = tmp_path / "serve.yaml"
    config.write_text(
        "worker_memory_limit: 900\nmax_worker_deaths: 3\nworker_death_window: 10\nrestart_backoff: 0.5\n"
        "torch_threads: 1\ninstall_model_deps: true\n"
    )
    settings = build_settings((str(echo_model),), (), str(config), {})
    assert settings.operator["worker_memory_limit_mb"] == 900
    assert (settings.operator["max_worker_deaths"], settings.operator["worker_death_window_s"]) == (3, 10)
    assert settings.operator["restart_backoff_s"] == 0.5
    assert settings.torch_threads == 1 and settings.install_model_deps is True
    flagged = build_settings((str(echo_model),), (), str(config), {"worker_memory_limit": 400.0})
    assert flagged.operator["worker_memory_limit_mb"] == 400.0
