"""``serve --reload`` as a handler author uses it: edit, save, and the server answers with the new code
while every request in flight is answered; a broken edit keeps the last good version serving."""

from __future__ import annotations

import textwrap
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HANDLER = """
import time


def handle(data, context):
    if data is None:
        {init}
        return None
    time.sleep(0.01)  # long enough that a switch always finds requests in flight
    return [{{"version": {version}}} for _ in data]
"""


def write_handler(path: Path, version: int, init: str = "pass", broken: bool = False) -> None:
    source = textwrap.dedent(HANDLER.format(version=version, init=init))
    if broken:
        source += "\ndef oops(:\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(source)
    tmp.replace(path)  # an editor's atomic save


class Traffic:
    """Clients posting back to back, recording every answer's status and version."""

    def __init__(self, call, url: str, clients: int = 4) -> None:
        self.answers: list[tuple[int, int | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(call, url)) for _ in range(clients)]

    def _run(self, call, url: str) -> None:
        while not self._stop.is_set():
            reply = call("POST", url, b"x", timeout=30)
            version = reply.json().get("version") if reply.status == 200 else None
            self.answers.append((reply.status, version))

    def latest(self) -> int | None:
        return self.answers[-1][1] if self.answers else None

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def _urls(ready: dict) -> tuple[str, str]:
    return (
        f"http://127.0.0.1:{ready['inference_port']}",
        f"http://127.0.0.1:{ready['management_port']}",
    )


def test_editing_a_handler_switches_the_answers_and_no_request_fails(tmp_path, serve_process, call, poll):
    handler = tmp_path / "src" / "my_handler.py"
    handler.parent.mkdir()
    write_handler(handler, 1)
    proc, ready = serve_process("--reload", "--model-name", "dev", "--handler", str(handler))
    base, mgmt = _urls(ready)
    url = base + "/predictions/dev"

    with Traffic(call, url) as traffic:
        poll(lambda: traffic.latest() == 1, what="answers from version 1")
        write_handler(handler, 2)
        poll(lambda: traffic.latest() == 2, timeout=15, what="answers from version 2")

        write_handler(handler, 3, broken=True)  # a syntax error: refused before anything loads
        error = poll(lambda: call("GET", mgmt + "/models/dev").json()[0]["reloadError"], what="reason")
        assert "does not parse" in error and "my_handler.py" in error

        write_handler(handler, 4, init='raise RuntimeError("no weights here")')  # fails in initialize
        poll(
            lambda: "no weights here" in (call("GET", mgmt + "/models/dev").json()[0]["reloadError"] or ""),
            timeout=15,
            what="the initialize failure as the reason",
        )
        served = len(traffic.answers)
        poll(lambda: len(traffic.answers) > served + 20, what="more answers")
        assert traffic.latest() == 2  # the last good version kept serving through both

        write_handler(handler, 5)
        poll(lambda: traffic.latest() == 5, timeout=15, what="answers from version 5")

    statuses = {status for status, _ in traffic.answers}
    assert statuses == {200}, f"{sum(s != 200 for s, _ in traffic.answers)} requests failed"
    versions = [v for _, v in traffic.answers]
    assert {1, 2, 5} <= set(versions) and 3 not in versions and 4 not in versions
    described = call("GET", mgmt + "/models/dev").json()[0]
    assert described["reloads"] == 2 and described["reloadError"] is None
    log = proc.log.read_text()
    assert "does not parse" in log and "no weights here" in log and "now serves the new files" in log


@pytest.mark.parametrize("archive_format", ["default", "no-archive"])
def test_a_rebuilt_archive_is_served_and_without_reload_nothing_is_watched(
    tmp_path, serve_process, call, poll, archive_format
):
    from archiver.build import build_archive

    handler = tmp_path / "src" / "my_handler.py"
    handler.parent.mkdir()
    store = tmp_path / "store"

    def rebuild(version: int) -> Path:
        write_handler(handler, version)
        return build_archive(
            model_name="arch",
            version="1.0",
            handler=str(handler),
            export_path=store,
            archive_format=archive_format,
            force=True,
        )

    mar = rebuild(1)
    _, watching = serve_process("--reload", str(mar))
    _, still = serve_process(str(mar))
    watching_url = _urls(watching)[0] + "/predictions/arch"
    still_url = _urls(still)[0] + "/predictions/arch"
    assert call("POST", watching_url, b"x").json() == {"version": 1}

    for version in (2, 3):  # each rebuild replaces the archive whole, as the archiver always does
        rebuild(version)
        poll(
            lambda v=version: call("POST", watching_url, b"x").json() == {"version": v},
            timeout=15,
            what=f"version {version}",
        )
    deadline = time.monotonic() + 2  # the other server had as long to notice, and must not have
    while time.monotonic() < deadline:
        assert call("POST", still_url, b"x").json() == {"version": 1}
        time.sleep(0.1)
    assert still["models"] == {"arch": "READY"}


def test_a_change_saved_while_the_model_loads_is_served_once_watching_starts(
    tmp_path, serve_process, call, poll
):
    # The watcher once started only after READY: a save made while the model loaded (here by the
    # handler's own initialize, so it always lands in that gap) was never seen.
    handler = tmp_path / "src" / "my_handler.py"
    handler.parent.mkdir()
    version_2 = textwrap.dedent(HANDLER.format(version=2, init="pass"))
    saving = tmp_path / "src" / "saving.tmp"
    save_now = (
        f"open({str(saving)!r}, 'w').write({version_2!r}); "
        f"__import__('os').replace({str(saving)!r}, {str(handler)!r})"
    )
    write_handler(handler, 1, init=save_now)
    proc, ready = serve_process("--reload", "--model-name", "dev", "--handler", str(handler))
    base, mgmt = _urls(ready)
    poll(
        lambda: call("POST", base + "/predictions/dev", b"x").json() == {"version": 2},
        timeout=30,
        what="the version saved during loading",
    )
    assert call("GET", mgmt + "/models/dev").json()[0]["reloads"] == 1
