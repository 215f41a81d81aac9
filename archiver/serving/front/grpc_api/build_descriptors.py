"""Regenerate ``descriptors.binpb`` from ``protos/*.proto``: a developer's step, never an install's.

The server reads its services' descriptors from that committed file (``messages.py``), so installing
the package needs no protoc; this module compiles the .proto files with grpcio-tools (a dev
dependency) when one of them changes: ``python -m archiver.serving.front.grpc_api.build_descriptors``.
``tests/serving/test_grpc_descriptors.py`` checks that the committed file is what the .proto files make.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = HERE / "protos"
DESCRIPTORS = HERE / "descriptors.binpb"
FILES = (
    "torchserve_inference.proto",
    "torchserve_management.proto",
    "open_inference.proto",
    "torchserve_open_inference.proto",
    "health.proto",
)


def compile_descriptors() -> bytes:
    """The FileDescriptorSet of ``FILES`` and everything they import (google/protobuf, google/rpc)."""
    import google.rpc.status_pb2
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    googleapis = Path(google.rpc.status_pb2.__file__).parents[2]  # google/rpc/status.proto
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.binpb"
        args = ["protoc", f"-I{PROTOS}", f"-I{well_known}", f"-I{googleapis}"]
        args += ["--include_imports", f"--descriptor_set_out={out}", *FILES]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + ", ".join(FILES))
        return out.read_bytes()


def main() -> int:
    DESCRIPTORS.write_bytes(compile_descriptors())
    print(f"wrote {DESCRIPTORS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
