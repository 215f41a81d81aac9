"""Hostile archives: each is refused by open/verify/extract, by `verify` and `inspect`, with one line.

Every archive here is built byte by byte in the test with zipfile/tarfile, the way an attacker would,
and nothing may be written outside the extraction folder.
"""

from __future__ import annotations

import io
import json
import tarfile
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import archiver
from archiver.cli import cli
from archiver.errors import (
    ArchiveFormatError,
    ArchiverError,
    IntegrityError,
    ManifestError,
    UnsafeArchiveError,
)
from archiver.reader import ReadLimits

HANDLER = b"def handle(data, context):\n    return data\n"


def manifest_bytes(**model) -> bytes:
    body = {"modelName": "evil", "handler": "h.py", "modelVersion": "1.0", **model}
    return json.dumps({"runtime": "python", "model": body}).encode()


def make_zip(path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicates we make on purpose
        for name, data in entries:
            zf.writestr(name, data)
    return path


def zip_link(name: str, target: str, mode: int = 0o120777) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info


def make_tgz(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def tar_file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def tar_special(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info, None


def good_members() -> list[tuple[str, bytes]]:
    return [("h.py", HANDLER), ("MAR-INF/MANIFEST.json", manifest_bytes())]


def tgz_good(prefix: str = "evil/") -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [tar_file(prefix + name, data) for name, data in good_members()]


def hostile_cases(tmp: Path) -> dict[str, tuple[Path, type[ArchiverError], str]]:
    """name → (archive, the error open/extract raise, a phrase the one-line message must contain)."""
    bomb = tmp / "bomb.mar"
    with zipfile.ZipFile(bomb, "w") as zf:
        zf.writestr("h.py", HANDLER)
        zf.writestr("MAR-INF/MANIFEST.json", manifest_bytes(serializedFile="w.pt"))
        info = zipfile.ZipInfo("w.pt")
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w") as out:  # 1 GiB of zeros in about 1 MB
            block = bytes(1 << 20)
            for _ in range(1024):
                out.write(block)
    cases = {
        "zip dotdot": (
            make_zip(tmp / "a.mar", [*good_members(), ("../evil.py", b"x")]),
            UnsafeArchiveError,
            "..",
        ),
        "zip absolute": (
            make_zip(tmp / "b.mar", [*good_members(), ("/tmp/evil.py", b"x")]),
            UnsafeArchiveError,
            "absolute",
        ),
        "zip symlink": (
            make_zip(tmp / "c.mar", [*good_members(), (zip_link("link", "/etc/passwd"), b"/etc/passwd")]),
            UnsafeArchiveError,
            "link or device",
        ),
        "zip device": (
            make_zip(tmp / "d.mar", [*good_members(), (zip_link("dev", "", 0o020666), b"")]),
            UnsafeArchiveError,
            "link or device",
        ),
        "zip duplicate": (
            make_zip(tmp / "e.mar", [*good_members(), ("h.py", b"evil")]),
            UnsafeArchiveError,
            "duplicate",
        ),
        "zip bomb": (bomb, UnsafeArchiveError, "decompression bomb"),
        "tgz dotdot": (
            make_tgz(tmp / "a.tar.gz", [*tgz_good(), tar_file("evil/../../x", b"x")]),
            UnsafeArchiveError,
            "..",
        ),
        "tgz absolute": (
            make_tgz(tmp / "b.tar.gz", [*tgz_good(), tar_file("/etc/x", b"x")]),
            UnsafeArchiveError,
            "absolute",
        ),
        "tgz symlink": (
            make_tgz(tmp / "c.tar.gz", [*tgz_good(), tar_special("evil/l", tarfile.SYMTYPE, "/etc/passwd")]),
            UnsafeArchiveError,
            "link or device",
        ),
        "tgz hardlink": (
            make_tgz(tmp / "d.tar.gz", [*tgz_good(), tar_special("evil/l", tarfile.LNKTYPE, "/etc/passwd")]),
            UnsafeArchiveError,
            "link or device",
        ),
        "tgz char device": (
            make_tgz(tmp / "e.tar.gz", [*tgz_good(), tar_special("evil/tty", tarfile.CHRTYPE)]),
            UnsafeArchiveError,
            "link or device",
        ),
        "tgz fifo": (
            make_tgz(tmp / "f.tar.gz", [*tgz_good(), tar_special("evil/p", tarfile.FIFOTYPE)]),
            UnsafeArchiveError,
            "link or device",
        ),
        "tgz duplicate": (
            make_tgz(tmp / "g.tar.gz", [*tgz_good(), tar_file("evil/h.py", b"evil")]),
            UnsafeArchiveError,
            "duplicate",
        ),
        "not an archive": (
            _write(tmp / "text.mar", b"just some text, not a zip\n" * 10),
            ArchiveFormatError,
            "not a",
        ),
        "truncated zip": (
            _truncated(make_zip(tmp / "t.mar", good_members()), tmp / "t2.mar"),
            ArchiveFormatError,
            "not a readable",
        ),
        "truncated tgz": (
            _truncated(make_tgz(tmp / "t.tar.gz", tgz_good()), tmp / "t2.tar.gz"),
            ArchiveFormatError,
            "not a readable",
        ),
        "no manifest": (
            make_zip(tmp / "m1.mar", [("h.py", HANDLER)]),
            ManifestError,
            "has no MAR-INF/MANIFEST.json",
        ),
        "manifest not json": (
            make_zip(tmp / "m2.mar", [("h.py", HANDLER), ("MAR-INF/MANIFEST.json", b"{not json")]),
            ManifestError,
            "not valid JSON",
        ),
        "manifest wrong type": (
            make_zip(
                tmp / "m3.mar", [("h.py", HANDLER), ("MAR-INF/MANIFEST.json", manifest_bytes(modelName=5))]
            ),
            ManifestError,
            "modelName must be a string",
        ),
    }
    return cases


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(source: Path, path: Path) -> Path:
    data = source.read_bytes()
    return _write(path, data[: len(data) // 2])


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict:
    return hostile_cases(tmp_path_factory.mktemp("hostile"))


CASE_NAMES = [
    "zip dotdot",
    "zip absolute",
    "zip symlink",
    "zip device",
    "zip duplicate",
    "zip bomb",
    "tgz dotdot",
    "tgz absolute",
    "tgz symlink",
    "tgz hardlink",
    "tgz char device",
    "tgz fifo",
    "tgz duplicate",
    "not an archive",
    "truncated zip",
    "truncated tgz",
    "no manifest",
    "manifest not json",
    "manifest wrong type",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_hostile_archive_is_refused_everywhere_with_one_line(cases, case, tmp_path):
    path, error, phrase = cases[case]
    with pytest.raises(error, match=None) as caught, archiver.open_archive(path) as reader:
        reader.extract(tmp_path / "dest")
    assert phrase in str(caught.value)
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == [], "nothing may be written on refusal"
    assert not (path.parent.parent / "evil.py").exists()

    runner = CliRunner()
    for command in ("verify", "inspect"):
        result = runner.invoke(cli, [command, str(path)], standalone_mode=False)
        assert isinstance(result.exception, error), (command, result.output)
    (tmp_path / "input.txt").write_text("hello")
    cache = tmp_path / "cache"
    args = ["predict", str(path), str(tmp_path / "input.txt"), "--cache-dir", str(cache)]
    result = runner.invoke(cli, args, standalone_mode=False)
    assert isinstance(result.exception, error), ("predict", result.output)
    assert phrase in str(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) in (["input.txt"], ["cache", "input.txt"])
    assert [p for p in cache.rglob("*") if p.is_file()] == [], "a refused load leaves nothing in the cache"


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_cli_refusal_is_one_line_without_traceback(cases, command):
    import subprocess
    import sys

    path, _error, phrase = cases["zip dotdot"]
    proc = subprocess.run(
        [sys.executable, "-m", "archiver", command, str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and phrase in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    "stream_limits, phrase",
    [
        (ReadLimits(max_ratio=10**9, max_total_bytes=64 << 20), "unpacks to more than"),
        (ReadLimits(max_ratio=200), "decompression bomb"),
    ],
)
def test_bomb_that_passes_the_header_checks_is_stopped_by_counting_bytes(
    cases, tmp_path, stream_limits, phrase
):
    """The headers are checked at open; the bytes actually inflated are counted again while unpacking."""
    path, _error, _phrase = cases["zip bomb"]
    with archiver.open_archive(path, limits=ReadLimits(max_ratio=10**9)) as reader:
        reader.limits = stream_limits  # as if the header checks had been fooled
        with pytest.raises(UnsafeArchiveError, match=phrase):
            reader.extract(tmp_path / "dest")
        assert not reader.verify().ok
    assert list(tmp_path.iterdir()) == []


def test_oversized_pax_header_is_refused_before_it_is_read(tmp_path):
    info = tarfile.TarInfo("evil/x")
    info.pax_headers = {"comment": "A" * (2 << 20)}
    path = make_tgz(tmp_path / "pax.tar.gz", [*tgz_good(), (info, b"x")])
    with pytest.raises(UnsafeArchiveError, match="tar metadata header"):
        archiver.open_archive(path)


def test_entries_overlapping_in_the_zip_are_refused(tmp_path):
    """Overlapping entries (Fifield's zip bomb): many directory records share one compressed body."""
    import os
    import struct

    good = make_zip(tmp_path / "good.mar", [*good_members(), ("w.bin", os.urandom(100_000))])
    data = good.read_bytes()
    eocd = data.rfind(b"PK\x05\x06")
    count, cd_size, cd_offset = struct.unpack("<HII", data[eocd + 10 : eocd + 20])
    directory = data[cd_offset : cd_offset + cd_size]
    records, pos = [], 0
    while pos < len(directory):
        name_len, extra_len, comment_len = struct.unpack("<HHH", directory[pos + 28 : pos + 34])
        end = pos + 46 + name_len + extra_len + comment_len
        records.append(directory[pos:end])
        pos = end
    body = next(r for r in records if r[46:51] == b"w.bin")
    copies = [body[:46] + f"w.bi{i}".encode() + body[51:] for i in range(5)]
    new_directory = b"".join(records + copies)
    tail = struct.pack("<HHII", count + 5, count + 5, len(new_directory), cd_offset) + data[eocd + 20 :]
    bad = _write(tmp_path / "overlap.mar", data[:cd_offset] + new_directory + data[eocd : eocd + 8] + tail)
    with pytest.raises(UnsafeArchiveError, match="entries overlap"):
        archiver.open_archive(bad)


def test_manifest_naming_absent_files(tmp_path):
    path = make_zip(
        tmp_path / "absent.mar",
        [("h.py", HANDLER), ("MAR-INF/MANIFEST.json", manifest_bytes(serializedFile="w.pt"))],
    )
    with archiver.open_archive(path) as reader:
        report = reader.verify()
        assert not report.ok
        assert report.problems == ["the manifest names 'w.pt', which is not in the archive"]
        with pytest.raises(IntegrityError, match="'w.pt', which is not in the archive"):
            reader.extract(tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    result = CliRunner().invoke(cli, ["verify", str(path)])
    assert result.exit_code == 1 and "problem: the manifest names 'w.pt'" in result.output


def test_tampered_file_fails_its_sha256(model_inputs, tmp_path):
    good = archiver.build_archive(**model_inputs.build_kwargs())
    tampered = tmp_path / "tampered.mar"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "my_handler.py":
                data = data.replace(b"return", b"import os; os.system('id'); return", 1)[: len(data)]
            dst.writestr(info, data)
    with archiver.open_archive(tampered) as reader:
        report = reader.verify()
        assert report.problems == ["tampered.mar: 'my_handler.py' does not match its sha256 in the manifest"]
        with pytest.raises(IntegrityError, match="does not match its sha256"):
            reader.read("my_handler.py")
        with pytest.raises(IntegrityError, match="does not match its sha256"):
            reader.extract(tmp_path / "dest")
    assert not [p for p in tmp_path.iterdir() if "dest" in p.name], "a refused extract leaves nothing"
    for command in ("verify", "inspect"):
        result = CliRunner().invoke(cli, [command, str(tampered)])
        assert result.exit_code == 1
        assert "problem: tampered.mar: 'my_handler.py' does not match its sha256" in result.output


def test_added_file_not_in_the_hashes_is_reported(model_inputs, tmp_path):
    good = archiver.build_archive(**model_inputs.build_kwargs())
    with zipfile.ZipFile(good, "a") as zf:
        zf.writestr("sneaky.py", b"print('hi')")
    with archiver.open_archive(good) as reader:
        assert "tiny.mar: 'sneaky.py' is not recorded in the manifest's hashes" in reader.verify().problems
        with pytest.raises(IntegrityError, match="not recorded"):
            reader.extract(tmp_path / "dest")


@pytest.mark.parametrize("name", ["a/" * 40 + "deep.txt", "x" * 300 + ".txt"])
def test_names_no_file_system_can_hold_are_refused_up_front(tmp_path, name):
    path = make_zip(tmp_path / "names.mar", [*good_members(), (name, b"x")])
    with pytest.raises(UnsafeArchiveError, match="nested too deep or has too long a name"):
        archiver.open_archive(path)


def test_symlink_inside_a_model_folder_is_refused(model_inputs, tmp_path):
    folder = archiver.build_archive(**model_inputs.build_kwargs(archive_format="no-archive"))
    (folder / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        archiver.open_archive(folder)


def _post(url: str, body: bytes) -> tuple[int, dict]:
    headers = {"Content-Type": "application/octet-stream"}  # as curl -T sends a file
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def test_serve_keeps_every_hostile_archive_out_and_answers_503_with_the_reason(cases, model_inputs, tmp_path):
    """A server started with every hostile archive beside a good one: each answers 503 at once with its
    reason, nothing is written outside the cache, and the good model and /ping keep answering."""
    from archiver.serving.front.server import ServerSettings, ServerThread

    good = archiver.build_archive(**model_inputs.build_kwargs())
    tampered = tmp_path / "tampered.mar"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            same_size = data.replace(b"len(", b"LEN(", 1)  # a one-byte change the size check cannot see
            dst.writestr(info, same_size if info.filename == "my_handler.py" else data)
    extra = {
        "tampered": (tampered, "does not match its sha256"),
        "absent": (
            make_zip(
                tmp_path / "absent.mar",
                [("h.py", HANDLER), ("MAR-INF/MANIFEST.json", manifest_bytes(serializedFile="w.pt"))],
            ),
            "'w.pt', which is not in the archive",
        ),
        "importfails": (
            make_zip(tmp_path / "imp.mar", [("h.py", b"import no_such_module_xyz\n"), good_members()[1]]),
            "no_such_module_xyz",
        ),
        "nohandle": (
            make_zip(tmp_path / "noh.mar", [("h.py", b"X = 1\n"), good_members()[1]]),
            "has no handle function",
        ),
    }
    hostile = {case.replace(" ", "-"): (cases[case][0], cases[case][2]) for case in CASE_NAMES} | extra
    before = {p for p in tmp_path.parent.rglob("*")}
    cache = tmp_path / "cache"
    settings = ServerSettings(
        port=0,
        management_port=0,
        metrics_port=0,
        models=[("good", good), *((name, path) for name, (path, _) in hostile.items())],
        cache_dir=cache,
    )
    with ServerThread(settings) as server:
        for name, (_path, phrase) in hostile.items():
            status, body = _post(server.url() + f"/predictions/{name}", b"hi")
            assert status == 503 and body["type"] == "ServiceUnavailableError", (name, body)
            assert phrase in body["message"] and "\n" not in body["message"], (name, body)
            assert _post(server.url() + "/predictions/good", b"hello") == (200, 5)
        with urllib.request.urlopen(server.url() + "/ping", timeout=10) as ping:
            assert json.loads(ping.read()) == {"status": "Healthy"}
    after = {p for p in tmp_path.parent.rglob("*") if not p.is_relative_to(cache)}
    assert after - before == set(), "nothing may be written outside the cache"


def test_a_model_config_with_python_tags_is_refused_and_nothing_runs(model_inputs, tmp_path):
    """Unsafe YAML (TorchServe's history): a tag that would call os.system is refused, never constructed."""
    from archiver.errors import ConfigError
    from archiver.serving import load_model

    marker = tmp_path / "ran"
    evil_yaml = f"batchSize: !!python/object/apply:os.system ['touch {marker}']\n".encode()
    model_inputs.config.write_bytes(evil_yaml)
    with pytest.raises(ConfigError, match="not valid YAML"):
        archiver.build_archive(**model_inputs.build_kwargs(config_file=str(model_inputs.config)))

    manifest = manifest_bytes(configFile="model-config.yaml")
    crafted = make_zip(
        tmp_path / "yaml.mar",
        [("h.py", HANDLER), ("model-config.yaml", evil_yaml), ("MAR-INF/MANIFEST.json", manifest)],
    )
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_model(crafted, cache_dir=tmp_path / "cache")
    assert not marker.exists()
