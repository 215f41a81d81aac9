"""A /ping poller for tests that must show the server kept answering while something hostile ran."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request


class PingWatch:
    """Polls /ping from a thread for as long as it is entered; ``slowest`` is the longest answer (an
    unanswered ping counts as forever)."""

    def __init__(self, url: str) -> None:
        self.url = url + "/ping"
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as resp:
                    resp.read()
            except urllib.error.HTTPError:
                pass  # 503 "Loading" while a model starts is an answer too
            except OSError:
                self.times.append(float("inf"))
                continue
            self.times.append(time.monotonic() - started)
            self._stop.wait(0.05)

    def __enter__(self) -> PingWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.3)  # a few pings after the last call too
        self._stop.set()
        self._thread.join()

    @property
    def slowest(self) -> float:
        return max(self.times)
