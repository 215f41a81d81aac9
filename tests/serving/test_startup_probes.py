"""A probe that arrives between the server binding its ports and listing its startup models must not
hear that all is well: the registry is empty then only because nothing has been listed yet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from archiver.serving.front.server import ServerSettings, ServerThread


def test_probes_say_not_ready_until_the_startup_models_are_listed(
    tmp_path: Path, echo_model: Path, call: Any, poll: Any
) -> None:
    settings = ServerSettings(
        port=0, management_port=0, metrics_port=0, models=[(None, echo_model)], cache_dir=tmp_path / "cache"
    )
    server = ServerThread(settings).start(load_models=False)
    try:
        base = server.url()
        # bound, nothing listed yet: the window a fast probe could hit
        assert call("GET", base + "/ping").json() == {"status": "Loading"}
        assert call("GET", base + "/v2/health/ready").json() == {"ready": False}
        assert call("GET", base + "/v2/health/live").json() == {"live": True}
        server.call(server.server.load_startup_models())
        poll(lambda: call("GET", base + "/v2/health/ready").status == 200, 60, "ready")
        assert call("GET", base + "/ping").json() == {"status": "Healthy"}
    finally:
        server.stop()


def test_a_server_without_startup_models_is_ready_at_once(serve: Any, call: Any) -> None:
    server = serve([])
    assert call("GET", server.url() + "/ping").json() == {"status": "Healthy"}
    assert call("GET", server.url() + "/v2/health/ready").json() == {"ready": True}
