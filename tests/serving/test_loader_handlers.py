"""load_model's handler contract: entry points, isolation, load errors, and one answer per request."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from archiver import build_archive
from archiver.errors import ArchiverError, HandlerError, HandlerInputError, IntegrityError
from archiver.reader import open_archive
from archiver.serving import load_model
from archiver.serving.protocols.records import make_request


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def function_archive(tmp_path: Path, name: str, source: str, *, extra: dict[str, str] | None = None) -> Path:
    """An archive whose handler is ``source`` (plus extra .py files), no model."""
    src = tmp_path / f"src-{name}"
    handler = write(src, "handler.py", source)
    extras = [str(write(src, n, text)) for n, text in (extra or {}).items()]
    return build_archive(
        model_name=name,
        version="2.0",
        handler=str(handler),
        extra_files=extras or None,
        export_path=str(tmp_path / "store"),
    )


def test_two_models_with_same_named_handler_files_do_not_collide(tmp_path):
    source = """
        from helper import WHO

        def handle(data, context):
            if data is None:
                return None
            return [WHO for _ in data]
    """
    a = function_archive(tmp_path, "a", source, extra={"helper.py": "WHO = 'model a'\n"})
    b = function_archive(tmp_path, "b", source, extra={"helper.py": "WHO = 'model b'\n"})

    model_a = load_model(a, cache_dir=tmp_path / "cache")
    model_b = load_model(b, cache_dir=tmp_path / "cache")

    assert model_a.predict(["x"]) == ["model a"]
    assert model_b.predict(["x"]) == ["model b"]
    assert "helper" not in sys.modules and "handler" not in sys.modules
    assert str(model_a.model_dir) not in sys.path and str(model_b.model_dir) not in sys.path


def test_a_function_entry_point_is_called_once_with_none_at_load_time(tmp_path):
    source = """
        CALLS = []

        def handle(data, context):
            CALLS.append(data)
            return None if data is None else [len(CALLS) for _ in data]
    """
    model = load_model(function_archive(tmp_path, "fn", source), cache_dir=tmp_path / "cache")

    assert model.predict([b"x", b"y"]) == [2, 2]


def test_module_function_handler_strings_pick_that_function(tmp_path):
    src = tmp_path / "src"
    handler = write(
        src, "entry.py", "def answer(data, context):\n    return data and ['picked' for _ in data]\n"
    )
    archive = build_archive(
        model_name="picked",
        version="1",
        handler=f"{handler}:answer".replace(".py:", ":"),
        export_path=str(tmp_path / "store"),
    )
    assert load_model(archive, cache_dir=tmp_path / "cache").predict(["x"]) == ["picked"]


def test_a_module_with_one_handler_class_and_a_helper_class_is_instantiated(tmp_path):
    source = """
        from dataclasses import dataclass

        @dataclass
        class Greeting:
            word: str

        class Greeter:
            def initialize(self, context):
                self.greeting = Greeting(context.model_yaml_config.get("handler", {}).get("word", "hi"))

            def handle(self, data, context):
                return [self.greeting.word for _ in data]
    """
    src = tmp_path / "src"
    handler = write(src, "greeter.py", source)
    config = write(src, "model-config.yaml", "batchSize: 4\nhandler:\n  word: hello\n")
    archive = build_archive(
        model_name="greeter",
        version="1",
        handler=str(handler),
        config_file=str(config),
        export_path=str(tmp_path / "store"),
    )

    model = load_model(archive, cache_dir=tmp_path / "cache")

    assert model.predict(["x"]) == ["hello"]
    assert model.config.batch_size == 4


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("import no_such_module_here\n", "failed to import: ModuleNotFoundError: No module named 'no_such_"),
        ("raise RuntimeError('broken at import')\n", "failed to import: RuntimeError: broken at import"),
        ("import sys\nsys.exit(3)\n", "failed to import: SystemExit: 3"),
        ("X = 1\n", "has no handle function and must define exactly one handler class (found: none)"),
        (
            "class A:\n    def handle(self, d, c): pass\nclass B:\n    def handle(self, d, c): pass\n",
            "exactly one handler class (found: A, B)",
        ),
        (
            "def handle(data, context):\n    if data is None:\n        raise ValueError('no weights')\n",
            "failed to initialize: ValueError: no weights",
        ),
    ],
    ids=["missing-import", "raises", "exits", "no-entry", "two-classes", "init-fails"],
)
def test_a_handler_that_cannot_load_is_refused_with_the_reason(tmp_path, source, reason):
    archive = function_archive(tmp_path, "broken", source)

    with pytest.raises(HandlerError) as caught:
        load_model(archive, cache_dir=tmp_path / "cache")

    assert reason in str(caught.value)
    assert "handler.py" in str(caught.value)


ROLES = """
    from handlers import HandlerInputError

    def handle(data, context):
        if data is None:
            return None
        texts = [row["body"] if isinstance(row["body"], str) else bytes(row["body"]).decode() for row in data]
        if "raise" in texts:
            raise RuntimeError("boom")
        if "short" in texts:
            return texts[:-1]
        if "tuple" in texts:
            return tuple(texts)
        answers = []
        for i, text in enumerate(texts):
            if text == "reject":
                answers.append(HandlerInputError("cannot use this one"))
            elif text == "teapot":
                context.set_response_status(418, "I'm a teapot", i)
                answers.append("short and stout")
            elif text == "png":
                context.set_response_content_type(i, "image/png")
                context.set_response_header(i, "X-Kind", "mask")
                answers.append(b"\\x89PNG fake")
            elif text == "object":
                answers.append(object())
            elif text == "raw":
                answers.append(b"\\x00\\x01")
            else:
                answers.append({"echo": text, "header": context.get_request_header(i, "x-trace")})
        return answers
"""


@pytest.fixture
def roles(tmp_path):
    return load_model(function_archive(tmp_path, "roles", ROLES), cache_dir=tmp_path / "cache")


def requests(*texts: str):
    return [
        make_request(f"r{i}", t.encode(), "text/plain", {"X-Trace": f"t{i}"}) for i, t in enumerate(texts)
    ]


def test_each_request_gets_its_own_answer_and_only_the_bad_ones_fail(roles):
    responses = roles.handle(requests("one", "reject", "teapot", "png", "object", "two"))

    assert [r.status for r in responses] == [200, 400, 418, 200, 500, 200]
    assert json.loads(responses[0].body) == {"echo": "one", "header": "t0"}
    assert responses[0].content_type == "application/json"
    assert json.loads(responses[1].body) == {
        "code": 400,
        "type": "HandlerInputError",
        "message": "cannot use this one",
    }
    assert json.loads(responses[2].body)["message"] == "I'm a teapot"
    assert (responses[3].body, responses[3].content_type) == (b"\x89PNG fake", "image/png")
    assert responses[3].headers == {"X-Kind": "mask"}
    assert "cannot be sent as JSON" in json.loads(responses[4].body)["message"]
    assert json.loads(responses[5].body)["echo"] == "two"


@pytest.mark.parametrize(
    ("trigger", "message"),
    [
        ("raise", "boom"),
        ("short", "handler returned 1 answers for a batch of 2 requests"),
        ("tuple", "handler returned a tuple for a batch of 2 requests"),
    ],
)
def test_a_failing_handler_fails_every_request_of_the_batch_and_keeps_working(roles, trigger, message):
    responses = roles.handle(requests("fine", trigger))

    assert [r.status for r in responses] == [500, 500]
    assert all(json.loads(r.body)["message"] == message for r in responses)
    assert roles.handle(requests("again"))[0].status == 200


def test_statuses_and_content_types_do_not_leak_into_the_next_batch(roles):
    roles.handle(requests("teapot", "png"))

    responses = roles.handle(requests("a", "b"))

    assert [r.status for r in responses] == [200, 200]
    assert [r.content_type for r in responses] == ["application/json"] * 2


def test_predict_decodes_answers_and_returns_errors_in_place(roles):
    answers = roles.predict(["hello", b"reject", "raw", "teapot"])

    assert answers[0] == {"echo": "hello", "header": None}
    assert isinstance(answers[1], HandlerInputError) and str(answers[1]) == "cannot use this one"
    assert answers[2] == b"\x00\x01"
    assert isinstance(answers[3], ArchiverError) and answers[3].http_status == 418


def test_closing_a_model_releases_its_handler(roles):
    roles.close()

    assert roles.handler is None
    with pytest.raises(HandlerError, match="closed"):
        roles.handle(requests("x"))


def test_a_build_scripts_own_copy_of_a_handler_module_does_not_shadow_the_archives(tmp_path, monkeypatch):
    script_dir = tmp_path / "script"
    write(script_dir, "helper.py", "WHO = 'the script folder'\n")
    monkeypatch.syspath_prepend(str(script_dir))
    import helper  # the build script imported its own helper.py before loading the archive

    source = "from helper import WHO\n\ndef handle(data, context):\n    return data and [WHO for _ in data]\n"
    archive = function_archive(tmp_path, "shadow", source, extra={"helper.py": "WHO = 'the archive'\n"})
    try:
        assert load_model(archive, cache_dir=tmp_path / "cache").predict(["x"]) == ["the archive"]
        assert sys.modules["helper"] is helper  # and the script's module is back
    finally:
        sys.modules.pop("helper", None)


def test_an_archive_cannot_replace_the_handlers_package(tmp_path):
    source = """
        from handlers import BaseHandler

        def handle(data, context):
            return data and [BaseHandler.__module__ for _ in data]
    """
    archive = function_archive(tmp_path, "impostor", source, extra={"handlers.py": "BaseHandler = None\n"})

    assert load_model(archive, cache_dir=tmp_path / "cache").predict(["x"]) == ["handlers.base"]


def test_a_missing_dependency_points_at_the_archives_requirements(tmp_path):
    src = tmp_path / "src"
    handler = write(src, "handler.py", "import package_that_is_not_installed\n")
    requirements = write(src, "requirements.txt", "package_that_is_not_installed==1.0\n")
    archive = build_archive(
        model_name="needs",
        version="1",
        handler=str(handler),
        requirements_file=str(requirements),
        export_path=str(tmp_path / "store"),
    )

    with pytest.raises(HandlerError, match=r"No module named .*pip install -r .*requirements.txt"):
        load_model(archive, cache_dir=tmp_path / "cache")


def test_a_tampered_archive_is_refused_before_any_code_runs(tmp_path):
    marker = tmp_path / "ran"
    source = f"open({str(marker)!r}, 'w').close()\ndef handle(data, context):\n    return data\n"
    archive = function_archive(tmp_path, "tampered", source)
    folder = tmp_path / "folder"
    with open_archive(archive) as reader:
        reader.extract(folder)
    (folder / "handler.py").write_text(source + "# changed\n")

    with pytest.raises(IntegrityError):
        load_model(folder, cache_dir=tmp_path / "cache")
    assert not marker.exists()
