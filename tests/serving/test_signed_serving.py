"""serve --trusted-key: only archives a trusted key signed load, at start, on register and on reload."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from archiver.build import build_archive
from archiver.signing import sign
from archiver.signing_keys import read_trusted_keys

HANDLER = """
def handle(data, context):
    if not data:
        return None
    rows = [row.get("data") or row.get("body") for row in data]
    return [{"echo": row.decode(), "model": context.model_name} for row in rows]
"""


@pytest.fixture
def kit(tmp_path: Path, ec_key_pair):
    """Keys (ours trusted, another not), a model store, and a builder of small real .mar files."""
    keys = tmp_path / "keys"
    keys.mkdir()
    ours, ours_pub = ec_key_pair(keys, "ours")
    other, _ = ec_key_pair(keys, "other")
    store = tmp_path / "store"
    handler = tmp_path / "src" / "echo_handler.py"
    handler.parent.mkdir()
    handler.write_text(HANDLER)

    def build(name: str, *, key: Path | None = ours, folder: Path = store, edition: int = 1) -> Path:
        handler.write_text(HANDLER + f"# edition {edition}\n")  # a new edition: other bytes
        mar = Path(
            build_archive(
                model_name=name, version="1.0", handler=str(handler), export_path=folder, force=True
            )
        )
        if key is not None:
            sign(mar, key)
        return mar

    class Kit:
        pass

    kit = Kit()
    kit.ours, kit.other, kit.store, kit.build = ours, other, store, build
    kit.trusted = read_trusted_keys([ours_pub])
    kit.fingerprint = kit.trusted[0].fingerprint
    return kit


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def bad_archives(kit) -> dict[str, tuple[Path, str]]:
    """One archive per way a signature fails, with the words its refusal must say."""
    tampered = kit.build("tampered")
    flip_byte(tampered)
    kit.build("stranger", key=kit.other)
    missing = kit.build("missing")
    missing.with_name("missing.mar.sig").unlink()
    truncated = kit.build("truncated")
    sig = truncated.with_name("truncated.mar.sig")
    sig.write_bytes(sig.read_bytes()[:200])
    swapped = kit.build("swapped")
    decoy = kit.build("decoy", folder=kit.store.parent / "elsewhere")
    shutil.copy(decoy.with_name("decoy.mar.sig"), swapped.with_name("swapped.mar.sig"))
    return {
        "tampered.mar": (tampered, "tampered.mar was changed after it was signed"),
        "stranger.mar": (kit.store / "stranger.mar", "stranger.mar is signed by another key"),
        "missing.mar": (missing, "missing.mar has no signature"),
        "truncated.mar": (truncated, "truncated.mar.sig is not an OpenSSF model-signing bundle"),
        "swapped.mar": (swapped, "swapped.mar.sig is the signature of another archive ('decoy.mar')"),
    }


def test_a_signed_archive_is_served_and_shows_its_signer(kit, serve, call):
    mar = kit.build("echo")
    server = serve([mar], trusted_keys=kit.trusted)
    assert call("POST", server.url() + "/predictions/echo", b"hi").json() == {"echo": "hi", "model": "echo"}
    described = call("GET", server.url("management") + "/models/echo").json()[0]
    assert described["status"] == "READY" and described["signedBy"] == kit.fingerprint


def test_without_trusted_keys_nothing_changes(kit, serve, call):
    mar = kit.build("plain", key=None)
    server = serve([mar])
    assert call("POST", server.url() + "/predictions/plain", b"hi").json()["echo"] == "hi"
    assert call("GET", server.url("management") + "/models/plain").json()[0]["signedBy"] is None


def test_each_bad_archive_is_failed_at_start_with_its_reason_and_counted(kit, serve, call):
    bad = bad_archives(kit)
    good = kit.build("good")
    server = serve([good, *(path for path, _ in bad.values())], trusted_keys=kit.trusted)
    mgmt = server.url("management")
    reasons = {}
    for name, (_, words) in bad.items():
        described = call("GET", f"{mgmt}/models/{name.removesuffix('.mar')}").json()[0]
        assert described["status"] == "FAILED"
        assert words in described["loadError"], described["loadError"]
        assert "\n" not in described["loadError"] and "Traceback" not in described["loadError"]
        reasons[name] = described["loadError"]
    assert len(set(reasons.values())) == len(reasons)
    assert call("POST", server.url() + "/predictions/good", b"ok").json()["echo"] == "ok"
    metrics = call("GET", server.url("metrics") + "/metrics").body.decode()
    for reason in ("tampered", "untrusted_key", "missing", "malformed", "other_archive"):
        assert f'model_archiver_signature_refusals_total{{reason="{reason}"}} 1.0' in metrics


def test_the_register_api_refuses_each_bad_archive_with_403(kit, serve, call):
    bad = bad_archives(kit)
    kit.build("good")
    server = serve(model_store=kit.store, trusted_keys=kit.trusted)
    mgmt = server.url("management")
    for url, (_, words) in bad.items():
        reply = call("POST", f"{mgmt}/models?url={url}")
        assert reply.status == 403, reply.body
        body = reply.json()
        assert body["code"] == 403 and words in body["message"] and "\n" not in body["message"]
    assert call("GET", mgmt + "/models").json() == {"models": []}  # nothing stayed registered
    assert call("POST", f"{mgmt}/models?url=good.mar").status == 200
    assert call("GET", mgmt + "/models/good").json()[0]["signedBy"] == kit.fingerprint


def test_a_folder_archive_is_refused_under_trusted_keys(kit, serve, call, make_model):
    folder = make_model("folder")
    sign(folder, kit.ours)  # signed, but a folder can change after its check
    server = serve([folder], trusted_keys=kit.trusted)
    described = call("GET", server.url("management") + "/models/folder").json()[0]
    assert described["status"] == "FAILED" and "is a folder archive" in described["loadError"]


def test_a_worker_started_later_refuses_an_archive_replaced_after_its_check(kit, serve, call, tmp_path):
    mar = kit.build("echo")
    server = serve([mar], trusted_keys=kit.trusted)
    mgmt = server.url("management")
    assert call("POST", server.url() + "/predictions/echo", b"1").status == 200
    # Someone with write access to the store swaps in another, unsigned archive of the same model (the
    # old signature stays beside it): the running worker is unaffected, but a new one must not load it.
    evil = tmp_path / "evil" / "echo_handler.py"
    evil.parent.mkdir()
    evil.write_text(HANDLER.replace('"echo": row.decode()', '"echo": "pwned"'))
    swap = build_archive(model_name="echo", version="1.0", handler=str(evil), export_path=tmp_path / "evil")
    shutil.copy(swap, mar)
    reply = call("PUT", mgmt + "/models/echo?min_worker=2&synchronous=true")
    assert reply.status == 500
    assert "echo.mar changed after its signature was verified" in reply.json()["message"]
    assert call("POST", server.url() + "/predictions/echo", b"2").json()["echo"] == "2"


def test_serve_command_fails_a_tampered_archive_at_start_and_reload_keeps_the_signed_one(
    kit, serve_process, call, poll
):
    good = kit.build("dev")
    pub = kit.store.parent / "keys" / "ours.pub"
    proc, ready = serve_process("--trusted-key", str(pub), "--reload", str(good))
    assert ready["models"] == {"dev": "READY"}
    mgmt = f"http://127.0.0.1:{ready['management_port']}"
    # a rebuilt archive that nobody signed: the reload is refused, the signed one still serves
    kit.build("dev", key=None, edition=2)
    poll(
        lambda: (
            (call("GET", mgmt + "/models/dev").json()[0]["reloadError"] or "").find("was changed after") >= 0
        ),
        timeout=30,
        what="the refused reload",
    )
    assert (
        call("POST", f"http://127.0.0.1:{ready['inference_port']}/predictions/dev", b"x").json()["echo"]
        == "x"
    )
    # signing it now (the signature file is watched too) brings the new archive in
    sign(good, kit.ours)
    poll(lambda: call("GET", mgmt + "/models/dev").json()[0]["reloads"] == 1, timeout=30, what="the reload")

    bad = kit.build("bad")
    flip_byte(bad)
    config = kit.store.parent / "serve.yaml"  # trusted_keys in --config: here the key's PEM text itself
    config.write_text(yaml.safe_dump({"trusted_keys": [pub.read_text()]}))
    proc2, ready2 = serve_process("--config", str(config), str(bad))
    assert ready2["models"] == {"bad": "FAILED"}
    log = proc2.log.read_text()
    assert "bad 1.0: FAILED: bad.mar was changed after it was signed" in log and "Traceback" not in log


def test_a_signed_sha256_in_the_operators_shell_does_not_reach_an_unsigned_server(
    kit, serve, call, monkeypatch
):
    # The pin once travelled as MODEL_ARCHIVER_SIGNED_SHA256 in the workers' environment: set in the
    # operator's shell, every worker of every model inherited it and refused its archive.
    monkeypatch.setenv("MODEL_ARCHIVER_SIGNED_SHA256", "0" * 64)
    mar = kit.build("plain", key=None)
    server = serve([mar])
    described = call("GET", server.url("management") + "/models/plain").json()[0]
    assert described["status"] == "READY", described.get("loadError")
    assert call("POST", server.url() + "/predictions/plain", b"hi").json()["echo"] == "hi"


def test_a_signed_archive_reached_through_a_symlink_is_served(kit, serve, call, tmp_path):
    kit.build("echo")
    (tmp_path / "link").symlink_to(kit.store, target_is_directory=True)  # a linked folder above it
    links = tmp_path / "links"  # a model store whose archive (and signature) are links themselves
    links.mkdir()
    other = kit.build("other")
    (links / "other.mar").symlink_to(other)
    (links / "other.mar.sig").symlink_to(other.with_name("other.mar.sig"))
    server = serve([tmp_path / "link" / "echo.mar"], trusted_keys=kit.trusted, model_store=links)
    mgmt = server.url("management")
    described = call("GET", mgmt + "/models/echo").json()[0]
    assert described["status"] == "READY", described.get("loadError")
    assert described["signedBy"] == kit.fingerprint
    assert call("POST", server.url() + "/predictions/echo", b"hi").json()["echo"] == "hi"
    reply = call("POST", mgmt + "/models?url=other.mar")
    assert reply.status == 200, reply.body
    assert call("POST", server.url() + "/predictions/other", b"yo").json() == {"echo": "yo", "model": "other"}


def test_a_signature_hashed_in_shards_is_refused_for_serving_with_its_reason(kit, serve, call):
    # model-signing can hash a file in shards: the check then gives no sha256 of the whole file to
    # hold the workers to, so the server refuses it rather than re-reading the file afterwards.
    from model_signing import hashing, signing

    mar = kit.build("sharded", key=None)
    config = signing.Config().use_elliptic_key_signer(private_key=kit.ours)
    config.set_hashing_config(hashing.Config().use_shard_serialization(shard_size=1024))
    config.sign(mar, mar.with_name("sharded.mar.sig"))
    server = serve([mar], trusted_keys=kit.trusted)
    described = call("GET", server.url("management") + "/models/sharded").json()[0]
    assert described["status"] == "FAILED"
    assert "sharded.mar.sig hashes sharded.mar in shards" in described["loadError"], described["loadError"]
    metrics = call("GET", server.url("metrics") + "/metrics").body.decode()
    assert 'model_archiver_signature_refusals_total{reason="unpinnable"} 1.0' in metrics


def test_handler_flags_are_a_usage_error_with_trusted_keys_from_the_config_too(kit, tmp_path):
    # --handler stages its flags as a folder, which trusted keys refuse: say so at once, whether the
    # keys came from --trusted-key or from --config's trusted_keys, instead of starting a server that
    # can only list the model FAILED.
    import subprocess
    import sys

    handler = tmp_path / "src" / "echo_handler.py"
    pub = kit.store.parent / "keys" / "ours.pub"
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"trusted_keys": [str(pub)]}))
    base = [sys.executable, "-m", "archiver", "serve", "--model-name", "m", "--handler", str(handler)]
    base += [
        "--port",
        "0",
        "--management-port",
        "0",
        "--metrics-port",
        "0",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    for keys in (["--trusted-key", str(pub)], ["--config", str(config)]):
        proc = subprocess.run([*base, *keys], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (keys, proc.stderr)
        assert "--handler serves unsigned files" in proc.stderr and "Traceback" not in proc.stderr
    assert not any((tmp_path / "c").rglob("echo_handler.py"))  # nothing staged is left behind
