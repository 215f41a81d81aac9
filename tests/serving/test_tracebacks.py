"""Errors that point at the user's code: the frames from the archive's own files, not ours."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest

from archiver.errors import HandlerError
from archiver.serving.worker.loader import load_model
from archiver.serving.worker.tracebacks import UserFrame, UserTrace, error_block, user_trace

CLI = [sys.executable, "-m", "archiver"]

# A function handler that fails, for the body "explode", two calls deep in its own files: the
# comprehension in handle, then check() in handler.py, then parse() in helpers.py.
FAILING_HANDLER = """
from helpers import parse


def check(row):
    value = bytes(row["body"]).decode()
    return parse(value)


def handle(data, context):
    if data is None:
        return None
    return [check(row) for row in data]
"""

HELPERS = """
def parse(value):
    if value == "explode":
        raise ValueError("cannot parse " + value)
    return {"parsed": value}
"""

# A class handler whose initialize fails in a helper function.
FAILING_INIT = """
def load_weights(name):
    raise FileNotFoundError("no weights named " + name)


class WeightsHandler:
    def initialize(self, context):
        self.weights = load_weights("w.pt")

    def handle(self, data, context):
        return data
"""


def _line(source: str, code: str) -> int:
    """The 1-based line of ``code`` in ``source`` as written to the archive (dedented)."""
    lines = textwrap.dedent(source).splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.strip() == code)


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "MODEL_ARCHIVER_TOKEN": ""}


@pytest.fixture
def failing_model(make_model):
    folder = make_model("failing", handler_source=FAILING_HANDLER)
    (folder / "helpers.py").write_text(textwrap.dedent(HELPERS))
    return folder


def _expected_frames() -> list[str]:
    handle_line = _line(FAILING_HANDLER, "return [check(row) for row in data]")
    check_line = _line(FAILING_HANDLER, "return parse(value)")
    raise_line = _line(HELPERS, 'raise ValueError("cannot parse " + value)')
    return [
        f"  handler.py:{handle_line} in handle: return [check(row) for row in data]",
        f"  handler.py:{check_line} in check: return parse(value)",
        f'  helpers.py:{raise_line} in parse: raise ValueError("cannot parse " + value)',
    ]


def test_user_trace_keeps_the_archive_frames_innermost_last(tmp_path, failing_model):
    model = load_model(failing_model, cache_dir=tmp_path / "cache")
    seen: list[BaseException] = []
    model.on_handler_error = seen.append
    answers = model.predict([b"fine", b"explode"])
    # The batch's answers are as before: each request a 500 with the exception's message, one line.
    assert [a.message for a in answers] == ["cannot parse explode", "cannot parse explode"]
    (exc,) = seen
    trace = user_trace(exc, model.model_dir)
    assert trace.exception == "ValueError: cannot parse explode"
    raise_line = _line(HELPERS, 'raise ValueError("cannot parse " + value)')
    assert trace.where == f"helpers.py:{raise_line}"
    # One line per frame; the comprehension's own frame (same line as handle's) is not repeated.
    assert trace.frame_lines() == _expected_frames()
    assert error_block('handler error in model "failing"', trace).splitlines() == [
        'handler error in model "failing": ValueError: cannot parse explode',
        *_expected_frames(),
    ]
    # Bounded: the innermost frames are kept, the rest counted.
    short = user_trace(exc, model.model_dir, limit=2)
    assert short.omitted == 1 and short.frame_lines() == ["  ... 1 earlier frames", *_expected_frames()[1:]]
    model.close()


def test_a_reporter_that_raises_does_not_change_the_answers(tmp_path, failing_model):
    model = load_model(failing_model, cache_dir=tmp_path / "cache")

    def broken_reporter(exc: BaseException) -> None:
        raise RuntimeError("the reporter itself failed")

    model.on_handler_error = broken_reporter
    answers = model.predict([b"explode"])
    assert answers[0].http_status == 500 and answers[0].message == "cannot parse explode"
    assert model.predict([b"ok"]) == [{"parsed": "ok"}]
    model.close()


def test_an_exception_outside_the_archive_has_no_frames(tmp_path):
    try:
        json.loads("{")
    except ValueError as exc:
        trace = user_trace(exc, tmp_path)
    assert trace == UserTrace(trace.exception) and trace.exception.startswith("JSONDecodeError: ")
    assert trace.where is None and trace.frame_lines() == []
    assert str(UserFrame("a.py", 3, "f", "")) == "a.py:3 in f"


def test_load_errors_carry_the_frames_of_initialize_and_of_a_syntax_error(tmp_path, make_model):
    broken_init = make_model("init", handler_source=FAILING_INIT)
    with pytest.raises(HandlerError) as info:
        load_model(broken_init, cache_dir=tmp_path / "cache")
    assert info.value.message == (
        "handler 'handler.py' failed to initialize: FileNotFoundError: no weights named w.pt"
    )
    init_line = _line(FAILING_INIT, 'self.weights = load_weights("w.pt")')
    raise_line = _line(FAILING_INIT, 'raise FileNotFoundError("no weights named " + name)')
    assert info.value.trace is not None
    assert info.value.trace.frame_lines() == [
        f'  handler.py:{init_line} in WeightsHandler.initialize: self.weights = load_weights("w.pt")',
        f'  handler.py:{raise_line} in load_weights: raise FileNotFoundError("no weights named " + name)',
    ]

    syntax = make_model("syntax", handler_source="import os\n\ndef handle(data, context)\n    return data\n")
    with pytest.raises(HandlerError) as info:
        load_model(syntax, cache_dir=tmp_path / "cache")
    assert info.value.trace is not None
    assert info.value.trace.frame_lines() == ["  handler.py:3 in <module>: def handle(data, context)"]


def test_predict_shows_the_handler_frames_under_a_failed_request(tmp_path, failing_model):
    (tmp_path / "in.txt").write_text("explode")
    result = subprocess.run(
        [*CLI, "predict", str(failing_model), str(tmp_path / "in.txt"), "--cache-dir", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert result.returncode == 1
    # stdout is the JSON answer as before; stderr says where, in the archive's files.
    assert json.loads(result.stdout)["message"] == "cannot parse explode"
    assert result.stderr.splitlines() == [
        'handler error in model "failing": ValueError: cannot parse explode',
        *_expected_frames(),
    ]
    assert "archiver/" not in result.stderr and "Traceback" not in result.stderr


def test_predict_shows_the_frames_of_a_failed_initialize(tmp_path, make_model):
    broken = make_model("init", handler_source=FAILING_INIT)
    (tmp_path / "in.txt").write_text("x")
    result = subprocess.run(
        [*CLI, "predict", str(broken), str(tmp_path / "in.txt"), "--cache-dir", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == (
        "model-archiver: error: handler 'handler.py' failed to initialize: "
        "FileNotFoundError: no weights named w.pt"
    )
    init_line = _line(FAILING_INIT, 'self.weights = load_weights("w.pt")')
    assert (
        f'  handler.py:{init_line} in WeightsHandler.initialize: self.weights = load_weights("w.pt")' in lines
    )
    assert len(lines) == 3 and "archiver/" not in result.stderr and "Traceback" not in result.stderr


def test_the_server_log_shows_the_handler_frames(serve_process, call, poll, failing_model, make_model):
    broken = make_model("init", handler_source=FAILING_INIT)
    proc, ready = serve_process(str(failing_model), str(broken), "--workers", "1")
    assert ready["models"] == {"failing": "READY", "init": "FAILED"}
    base = f"http://127.0.0.1:{ready['inference_port']}"
    reply = call("POST", base + "/predictions/failing", b"explode")
    # The client's answer is unchanged: the exception's message, one line, no frames.
    assert reply.status == 500 and reply.json()["message"] == "cannot parse explode"
    assert call("POST", base + "/predictions/failing", b"fine").json() == {"parsed": "fine"}

    expected = _expected_frames()

    def log_with_frames() -> str | None:
        text = proc.log.read_text()
        return text if expected[-1] in text else None

    log = poll(log_with_frames, what="the frames in the log")
    prefix = r"\[failing w1 pid \d+\] "
    header = re.escape('handler error in model "failing": ValueError: cannot parse explode')
    assert re.search(prefix + header + "\n" + "\n".join(prefix + re.escape(f) for f in expected), log), log
    # The load failure of the other model names its frame too, in its worker's lines.
    init_line = _line(FAILING_INIT, 'self.weights = load_weights("w.pt")')
    assert re.search(
        r"\[init w1 pid \d+\] "
        + re.escape(
            f'  handler.py:{init_line} in WeightsHandler.initialize: self.weights = load_weights("w.pt")'
        ),
        log,
    ), log
    assert "Traceback" not in log and "archiver/serving" not in log


def test_a_very_long_line_is_cut_and_a_deep_recursion_stays_a_few_lines(tmp_path):
    path = tmp_path / "deep.py"
    path.write_text(
        "def down(n):\n"
        "    return down(n - 1) if n else up(n)\n"
        "\n"
        "def up(n):\n"
        f"    raise RuntimeError('deep') if n == 0 else {'n + ' * 100}1\n"
    )
    namespace: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    with pytest.raises(RuntimeError) as info:
        namespace["down"](50)
    trace = user_trace(info.value, tmp_path)
    # 51 calls on one line are one frame; the long line ends in an ellipsis.
    assert [f"{f.file}:{f.line} in {f.function}" for f in trace.frames] == [
        "deep.py:2 in down",
        "deep.py:5 in up",
    ]
    assert len(trace.frames[-1].code) == 200 and trace.frames[-1].code.endswith("…")


def test_a_bug_in_the_front_answers_500_without_the_servers_paths(serve, call, echo_model, monkeypatch):
    """A route that fails with no ArchiverError of its own (a bug, a file gone) answers one JSON line;
    the paths the exception names are shortened as a handler's are, never the interpreter's folders."""
    from archiver.serving.supervisor.registry import ModelRegistry

    server = serve([echo_model])
    gone = f"{sys.prefix}/lib/python3.12/site-packages/somepkg/data/table.bin"

    def missing(self):  # the fault injected: a file the route reads has gone
        raise FileNotFoundError(2, "No such file or directory", gone)

    monkeypatch.setattr(ModelRegistry, "names", missing)
    reply = call("GET", server.url("management") + "/models")
    error = reply.json()
    assert reply.status == 500 and error["type"] == "InternalServerError", error
    assert error["message"].startswith("FileNotFoundError: [Errno 2] No such file or directory"), error
    assert "somepkg/data/table.bin" in error["message"], error  # what is missing, from its package on
    assert sys.prefix not in error["message"] and "site-packages" not in error["message"], error
    monkeypatch.undo()
    assert call("GET", server.url("management") + "/models").status == 200
