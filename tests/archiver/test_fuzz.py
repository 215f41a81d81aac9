"""Property tests: random and mutated manifests and archives never raise anything but ArchiverError.

Bounded for CI (200 examples each, no deadline); a failure prints the exact bytes that broke us.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import tempfile
import zipfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import archiver
from archiver.errors import ArchiverError, ManifestError
from archiver.manifest import Manifest
from archiver.reader import ReadLimits

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Small limits keep a mutated size field from costing real time or memory.
LIMITS = ReadLimits(max_total_bytes=8 << 20, ratio_floor_bytes=1 << 20)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
manifest_keys = st.sampled_from(
    ["modelName", "handler", "modelVersion", "serializedFile", "modelFile", "configFile", "requirementsFile"]
)
manifest_like = st.fixed_dictionaries(
    {},
    optional={
        "runtime": st.sampled_from(["python", "python3", "LSP", "java"]) | json_values,
        "createdOn": st.text(max_size=20) | json_values,
        "archiverVersion": st.text(max_size=8) | json_values,
        "model": st.dictionaries(manifest_keys, st.text(min_size=1, max_size=12) | json_values, max_size=7)
        | json_values,
        "integrity": st.fixed_dictionaries(
            {"files": st.dictionaries(st.text(max_size=8), json_values | st.fixed_dictionaries(
                {"sha256": st.text("0123456789abcdef", min_size=64, max_size=64) | json_values,
                 "size": st.integers(-2, 10) | json_values}), max_size=3)},
            optional={"algorithm": st.sampled_from(["sha256", "md5"]) | json_values},
        )
        | json_values,
    },
)  # fmt: skip


@FUZZ
@given(st.binary(max_size=300))
def test_manifest_parser_on_random_bytes(raw):
    with contextlib.suppress(ManifestError):
        Manifest.from_json(raw)


@FUZZ
@given(manifest_like)
def test_manifest_parser_on_manifest_shaped_values(data):
    try:
        manifest = Manifest.from_dict(data)
    except ManifestError:
        return
    again = Manifest.from_json(manifest.to_json())
    assert again.to_dict() == manifest.to_dict()


def _valid_archives() -> dict[str, bytes]:
    manifest = Manifest(
        model_name="m",
        handler="h.py",
        model_version="1",
        serialized_file="w.pt",
        files=None,
    ).to_json()
    members = {
        "h.py": b"def handle(d, c):\n    return d\n",
        "w.pt": bytes(range(256)) * 8,
        "sub/x.txt": b"x" * 500,
    }
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr("MAR-INF/MANIFEST.json", manifest)
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w:gz") as tar:
        for name, data in [*members.items(), ("MAR-INF/MANIFEST.json", manifest)]:
            info = tarfile.TarInfo(f"m/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return {"zip": zbuf.getvalue(), "tgz": tbuf.getvalue()}


VALID = _valid_archives()


def exercise(data: bytes) -> None:
    """Open, list, read, verify and extract; only ArchiverError may come out."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.mar"
        path.write_bytes(data)
        try:
            with archiver.open_archive(path, limits=LIMITS) as reader:
                for name in reader.files():
                    with contextlib.suppress(ArchiverError):
                        reader.read(name)
                reader.verify()
                dest = reader.extract(Path(tmp) / "out")
                assert all(str(p.resolve()).startswith(str(dest.resolve())) for p in dest.rglob("*"))
        except ArchiverError:
            pass
        assert sorted(os.listdir(tmp)) in (["fuzz.mar"], ["fuzz.mar", "out"])


@FUZZ
@given(st.sampled_from([b"PK\x03\x04", b"\x1f\x8b\x08\x00", b""]), st.binary(max_size=400))
def test_reader_on_random_bytes(magic, tail):
    exercise(magic + tail)


@FUZZ
@given(
    st.sampled_from(["zip", "tgz"]),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
    st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_reader_on_mutated_archives(kind, flips, cut):
    data = bytearray(VALID[kind])
    for position, value in flips:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    exercise(bytes(data))


def test_the_unmutated_archives_are_valid(tmp_path):
    for kind, data in VALID.items():
        path = tmp_path / f"ok.{kind}"
        path.write_bytes(data)
        with archiver.open_archive(path) as reader:
            assert reader.verify().ok
            assert json.loads(reader.read("MAR-INF/MANIFEST.json"))["model"]["modelName"] == "m"
