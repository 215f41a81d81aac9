"""Fixtures every test area shares: the real kitten photo and free loopback ports."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def kitten_path() -> Path:
    """A real photo of a cat (scikit-image's 'chelsea', BSD-3; see tests/data/ATTRIBUTION.md)."""
    return DATA / "kitten.jpg"


@pytest.fixture(scope="session")
def kitten_bytes(kitten_path: Path) -> bytes:
    return kitten_path.read_bytes()


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (tests never bind anything else)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def free_ports():
    """A function returning n distinct free loopback ports."""

    def take(n: int) -> list[int]:
        ports: set[int] = set()
        while len(ports) < n:
            ports.add(free_port())
        return sorted(ports)

    return take
