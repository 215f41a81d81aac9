"""Fixtures every test area shares: the real kitten photo and free loopback ports."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import pytest

# Before any test module imports grpc: with gRPC's fork support on (its default once grpc is imported
# without this), each worker the in-process servers start by fork runs gRPC's fork handlers, and a
# worker died of SIGSEGV in them now and then. The server itself sets this before it imports grpc
# (archiver/serving/front/grpc_api/__init__.py); here a test module may import grpc first.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

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


_SESSION_MARK = "MODEL_ARCHIVER_TEST_SESSION"


@pytest.fixture(scope="session", autouse=True)
def no_worker_outlives_the_tests():
    """Every process this session starts inherits a marker in its environment (servers pass theirs on
    to their workers); at the end none may be left, whoever its parent is by then."""
    import os
    import time
    import uuid

    import psutil

    mark = uuid.uuid4().hex
    os.environ[_SESSION_MARK] = mark
    yield

    def ours() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.pid != os.getpid() and proc.environ().get(_SESSION_MARK) == mark:
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    deadline = time.monotonic() + 15  # a worker told to stop may still be finishing
    while (left := ours()) and time.monotonic() < deadline:
        time.sleep(0.2)
    described = []
    for proc in left:
        with contextlib.suppress(psutil.Error):
            described.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            proc.kill()
    assert not left, "processes outlived the tests: " + "; ".join(described)


def write_ec_key_pair(folder: Path, name: str, curve: str = "P-256") -> tuple[Path, Path]:
    """(private key PEM, public key PEM) of a fresh EC key in ``folder``, as ``openssl ecparam -genkey``
    would write them: the signing tests of every area make their keys this way."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    curves = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}
    key = ec.generate_private_key(curves[curve]())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


@pytest.fixture
def ec_key_pair():
    """write_ec_key_pair(folder, name, curve="P-256"): a fresh EC key pair written as PEM files."""
    return write_ec_key_pair
