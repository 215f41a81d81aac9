"""Per-model dependencies (``serve --install-model-deps``): an archive's requirementsFile installed into
a cached virtual environment that its workers run on.

Most tests install a wheel made here, from a local folder with the index turned off (PIP_NO_INDEX,
PIP_FIND_LINKS), so they need no network. The one marked ``network`` installs a real package from the
package index pip is configured with (PyPI in CI), as an operator's server would.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from archiver.errors import DependencyError
from archiver.serving.supervisor.model_venvs import MARKER, env_key, model_python
from archiver.serving.supervisor.requirements_check import check_requirements

TINY = "mad_tiny_dep"  # the wheel below; nothing of that name exists on PyPI
# small, pure Python, no dependencies, and installed by none of our extras (kserve pulls tabulate in)
REAL = "humanize"

TINY_HANDLER = f"""
import {TINY}


def handle(data, context):
    return data and [{{"value": {TINY}.VALUE, "from": {TINY}.__file__}} for _ in data]
"""

REAL_HANDLER = f"""
import {REAL}


def handle(data, context):
    return data and [{{"number": {REAL}.intcomma(1234567), "from": {REAL}.__file__}} for _ in data]
"""


def with_requirements(folder: Path, requirements: str) -> Path:
    """Add a requirements.txt to a folder archive and name it in its manifest (as -r would)."""
    (folder / "requirements.txt").write_text(requirements)
    manifest_path = folder / "MAR-INF" / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["requirementsFile"] = "requirements.txt"
    manifest_path.write_text(json.dumps(manifest))
    return folder


def tiny_wheel(folder: Path, name: str = TINY, version: str = "1.0") -> Path:
    """A minimal pure-Python wheel (one module with VALUE = 42), written by hand: no build tools."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"VALUE = 42\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    files[f"{dist}/RECORD"] = ("\n".join([*record, f"{dist}/RECORD,,"]) + "\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


@pytest.fixture
def offline_pip(tmp_path, monkeypatch) -> dict[str, str]:
    """pip sees no index, only a folder holding the tiny wheel; returns those variables."""
    tiny_wheel(tmp_path / "wheels")
    variables = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path / "wheels")}
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    return variables


def serve_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MODEL_ARCHIVER_TOKEN": "", **extra}


# ---- what a requirements file may ask for --------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "tabulate",
        "tabulate==0.9.0",
        "Tabulate >= 0.8, < 1  # a comment",
        "requests[socks]~=2.31; python_version >= '3.8'",
        "tabulate==0.9.0 --hash=sha256:0095b12bf5966de529c0feb1fa08671671b3368eec77d7ef7ab114be2c068b3c",
        "--only-binary :all:",
        "--prefer-binary",
        "pkg @ https://example.com/pkg-1.0-py3-none-any.whl",
        "pkg @ git+https://github.com/example/pkg@v1.0",
    ],
)
def test_plain_requirements_are_accepted(line):
    check_requirements(f"# a header\n\n{line}\n".encode())


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("-r other.txt", "other files"),
        ("-c constraints.txt", "other files"),
        ("-e ../src", "editable"),
        ("--editable=git+https://x/y", "editable"),
        ("--index-url https://evil.example/simple", "pip configuration"),
        ("--extra-index-url=https://evil.example/simple", "pip configuration"),
        ("-i https://evil.example/simple", "pip configuration"),
        ("--find-links /tmp/wheels", "pip configuration"),
        ("--trusted-host evil.example", "pip configuration"),
        ("./vendored/pkg", "local paths"),
        ("/etc/passwd", "local paths"),
        ("../pkg-1.0.tar.gz", "local paths"),
        ("pkg-1.0-py3-none-any.whl", "local archive"),
        ("pkg @ file:///home/me/pkg", "only https"),
        ("file:../pkg", "only https"),
        ("pkg @ http://example.com/pkg.whl", "only https"),
        ("git+ssh://git@github.com/x/y", "only https"),
        ("pkg @ https://example.com/${AWS_SECRET_ACCESS_KEY}.whl", "environment variables"),
        ("pkg --global-option=--build-option", "refused"),
        ("pkg --config-settings=x=y", "refused"),
        ("--prefer", "refused"),  # pip would take an abbreviation; we do not
    ],
)
def test_requirements_that_reach_outside_the_archive_or_the_index_are_refused(line, reason):
    with pytest.raises(DependencyError, match=reason) as info:
        check_requirements(f"tabulate\n{line}\n".encode(), "requirements.txt")
    assert "requirements.txt line 2" in str(info.value) and "\n" not in str(info.value)


def test_a_refused_file_is_the_load_error_before_anything_is_made(make_model, tmp_path):
    model = with_requirements(make_model("editable", handler_source=TINY_HANDLER), "-e ../../elsewhere\n")
    with pytest.raises(DependencyError, match="editable installs are refused"):
        model_python(model, "requirements.txt", tmp_path / "cache")
    assert not (tmp_path / "cache" / "envs").exists()


def test_comments_and_blank_lines_alone_need_no_environment(make_model, tmp_path):
    model = with_requirements(make_model("nothing", handler_source=TINY_HANDLER), "# none yet\n\n")
    assert model_python(model, "requirements.txt", tmp_path / "cache") == sys.executable
    assert not (tmp_path / "cache" / "envs").exists()


# ---- the environment ---------------------------------------------------------------------------------


def test_an_environment_is_built_once_shared_and_sees_the_servers_packages(
    make_model, tmp_path, offline_pip, caplog
):
    caplog.set_level(logging.INFO, "archiver.serving")
    requirements = f"{TINY}==1.0\ntorch\n"  # torch: already there, so satisfied, never installed again
    one = with_requirements(make_model("one", handler_source=TINY_HANDLER), requirements)
    two = with_requirements(make_model("two", handler_source=TINY_HANDLER), requirements)
    cache = tmp_path / "cache"
    env = cache / "envs" / env_key(requirements.encode())
    (env / "bin").mkdir(parents=True)  # the remains of a build that was killed: no marker, so not used
    (env / "bin" / "python").symlink_to(os.path.realpath(sys.executable))

    pythons: list[str] = []
    racers = [
        threading.Thread(target=lambda m=m: pythons.append(model_python(m, "requirements.txt", cache)))
        for m in (one, two)
    ]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(300)

    assert pythons == [str(env / "bin" / "python")] * 2
    messages = [r.getMessage() for r in caplog.records]
    assert sum("installing requirements.txt into a new environment" in m for m in messages) == 1
    assert any("discarding" in m for m in messages)
    assert any("reusing the environment" in m and "just built by another" in m for m in messages)
    assert any(f"pip: Successfully installed {TINY}" in m.replace("-", "_") for m in messages)
    assert (env / MARKER).is_file()

    probe = (
        f"import archiver, handlers, {TINY}, importlib.util; "
        f"print({TINY}.__file__); print(importlib.util.find_spec('torch').origin)"
    )
    out = subprocess.run([pythons[0], "-c", probe], capture_output=True, text=True, check=True).stdout
    tiny_file, torch_file = out.split()
    assert tiny_file.startswith(str(env)) and not torch_file.startswith(str(env))

    caplog.clear()
    assert model_python(one, "requirements.txt", cache) == pythons[0]
    assert [m for m in (r.getMessage() for r in caplog.records) if "deps:" in m] == [
        f"deps: one: reusing the environment {env} (no pip run)"
    ]


def test_a_failed_install_raises_pips_last_lines_and_leaves_nothing(make_model, tmp_path, offline_pip):
    model = with_requirements(make_model("missing", handler_source=TINY_HANDLER), "mad-no-such-dep==9.9\n")
    cache = tmp_path / "cache"
    with pytest.raises(DependencyError) as info:
        model_python(model, "requirements.txt", cache)
    message = str(info.value)
    assert message.startswith("installing the requirements of missing failed (pip exit code 1): ")
    assert "No matching distribution found for mad-no-such-dep==9.9" in message and "\n" not in message
    assert [p.name for p in (cache / "envs").iterdir() if not p.name.endswith(".lock")] == []


# ---- the server ------------------------------------------------------------------------------------


def test_without_the_flag_a_missing_module_is_a_503_that_names_the_flag(serve_process, call, make_model):
    model = with_requirements(make_model("needs", handler_source=TINY_HANDLER), f"{TINY}==1.0\n")
    _, ready = serve_process(str(model), "--workers", "1")
    assert ready["models"] == {"needs": "FAILED"}

    reply = call("POST", f"http://127.0.0.1:{ready['inference_port']}/predictions/needs", b"x")
    assert reply.status == 503
    text = reply.body.decode()
    assert f"No module named '{TINY}'" in text and "serve with --install-model-deps to install them" in text


def test_serve_installs_each_models_requirements_and_a_failure_is_that_models_load_error(
    serve_process, call, make_model, offline_pip
):
    good = with_requirements(make_model("good", handler_source=TINY_HANDLER), f"{TINY}==1.0\n")
    bad = with_requirements(make_model("bad", handler_source=TINY_HANDLER), "mad-no-such-dep==9.9\n")
    proc, ready = serve_process(
        str(good), str(bad), "--workers", "1", "--install-model-deps", env=serve_env(**offline_pip)
    )
    assert ready["models"] == {"bad": "FAILED", "good": "READY"}

    base = f"http://127.0.0.1:{ready['inference_port']}"
    answer = call("POST", base + "/predictions/good", b"x").json()
    assert answer["value"] == 42 and "/cache/envs/" in answer["from"]
    reply = call("POST", base + "/predictions/bad", b"x")
    assert reply.status == 503
    assert "pip exit code 1" in reply.body.decode()
    assert "No matching distribution found for mad-no-such-dep==9.9" in reply.body.decode()
    log = proc.log.read_text()
    assert "deps: good: installing requirements.txt" in log and "deps: good: installed" in log


@pytest.mark.network
@pytest.mark.slow
def test_serve_installs_a_package_from_the_index_once_and_reuses_it_on_the_next_start(
    serve_process, call, make_model, tmp_path
):
    """The acceptance test: a real package from the configured index (PyPI in CI)."""
    assert importlib.util.find_spec(REAL) is None, f"{REAL} is installed here; the test needs one that is not"
    model = with_requirements(make_model("numbers", handler_source=REAL_HANDLER), f"{REAL}\n")
    envs = tmp_path / "cache" / "envs"

    started = time.perf_counter()
    proc, ready = serve_process(str(model), "--workers", "1", "--install-model-deps")
    first_s = time.perf_counter() - started
    url = f"http://127.0.0.1:{ready['inference_port']}/predictions/numbers"
    answer = call("POST", url, b"x").json()
    assert answer["number"] == "1,234,567"
    assert answer["from"].startswith(str(envs))
    first_log = proc.log.read_text()
    assert "deps: numbers: installing requirements.txt" in first_log
    assert f"deps: numbers: pip: Successfully installed {REAL}" in first_log
    (env,) = [p for p in envs.iterdir() if p.is_dir()]
    built = (env / MARKER).stat().st_mtime_ns
    proc.terminate()
    proc.wait(30)

    started = time.perf_counter()
    proc, ready = serve_process(str(model), "--workers", "1", "--install-model-deps")
    second_s = time.perf_counter() - started
    url = f"http://127.0.0.1:{ready['inference_port']}/predictions/numbers"
    assert call("POST", url, b"x").json()["from"].startswith(str(env))
    second_log = proc.log.read_text()
    assert f"deps: numbers: reusing the environment {env} (no pip run)" in second_log
    assert "pip:" not in second_log and "installing" not in second_log
    assert (env / MARKER).stat().st_mtime_ns == built
    pip_s = float(re.search(r"deps: numbers: installed requirements.txt in ([0-9.]+) s", first_log)[1])
    print(
        f"\nserve --install-model-deps until ready: first {first_s:.1f} s (venv + pip {pip_s:.1f} s), "
        f"second {second_s:.1f} s (reused)"
    )
