"""Signed archives on Ray Serve and KServe: `deploy --trusted-key` carries the keys, and a replica or the
KServe runtime verifies its archive before loading it, refusing a tampered one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from archiver.build import build_archive
from archiver.cli import cli
from archiver.signing import sign

ECHO = """
def handle(data, context):
    if not data:
        return None
    values = [row.get("data") if row.get("data") is not None else row.get("body") for row in data]
    texts = [v.decode() if isinstance(v, (bytes, bytearray)) else str(v) for v in values]
    return [{"echo": text, "signed": True} for text in texts]
"""
NO_CPU = "ray:\n  ray_actor_options:\n    num_cpus: 0\n"  # the machine's two cores are not ours to hold


@pytest.fixture
def signed_kit(tmp_path: Path, ec_key_pair):
    """A key pair, and a builder of small .mar files signed with it (or tampered after signing)."""
    private, public = ec_key_pair(tmp_path, "key")
    src = tmp_path / "src"
    src.mkdir()
    (src / "echo_handler.py").write_text(ECHO)
    (src / "model-config.yaml").write_text(NO_CPU)

    def build(name: str, folder: str = "store", tampered: bool = False) -> Path:
        mar = Path(
            build_archive(
                model_name=name,
                version="1.0",
                handler=str(src / "echo_handler.py"),
                config_file=str(src / "model-config.yaml"),
                export_path=tmp_path / folder,
            )
        )
        sign(mar, private)
        if tampered:  # one byte flipped after signing (the signature stays beside it)
            data = bytearray(mar.read_bytes())
            data[len(data) // 2] ^= 0x01
            mar.write_bytes(bytes(data))
        return mar

    return type("SignedKit", (), {"build": staticmethod(build), "public": public, "tmp": tmp_path})


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_deploy_ray_embeds_the_keys_and_refuses_an_archive_that_does_not_verify(signed_kit):
    good = signed_kit.build("echo")
    out = signed_kit.tmp / "serve_config.yaml"
    result = run_cli("deploy", "ray", str(good), "--trusted-key", str(signed_kit.public), "-o", str(out))
    assert result.exit_code == 0, result.output
    args = yaml.safe_load(out.read_text())["applications"][0]["args"]
    assert args["trusted_keys"] == [signed_kit.public.read_text()]

    bad = signed_kit.build("bad", folder="bad", tampered=True)
    out2 = signed_kit.tmp / "bad.yaml"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "model-archiver"), "deploy", "ray", str(bad)]
        + ["--trusted-key", str(signed_kit.public), "-o", str(out2)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and not out2.exists()
    assert proc.stderr.startswith("model-archiver: error: bad.mar was changed after it was signed")
    assert len(proc.stderr.splitlines()) == 1


def test_deploy_kserve_mounts_the_keys_from_a_configmap(signed_kit):
    good = signed_kit.build("echo")
    out = signed_kit.tmp / "k8s"
    result = run_cli(
        "deploy", "kserve", str(good), "--storage-uri", "pvc://models/echo", "-o", str(out),
        "--trusted-key", str(signed_kit.public),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config_map = yaml.safe_load((out / "05-trusted-keys.yaml").read_text())
    assert config_map["kind"] == "ConfigMap"
    assert config_map["data"] == {"key-1.pub": signed_kit.public.read_text()}
    spec = yaml.safe_load((out / "00-servingruntime.yaml").read_text())["spec"]
    container = spec["containers"][0]
    assert "--trusted_key=/etc/model-archiver/trusted-keys/key-1.pub" in container["args"]
    assert container["volumeMounts"][0]["mountPath"] == "/etc/model-archiver/trusted-keys"
    assert spec["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]
    assert "torchmar[kserve,signing]" in (out / "Dockerfile").read_text()


@pytest.mark.slow
def test_the_kserve_runtime_refuses_a_tampered_archive_and_serves_a_signed_one(signed_kit, kit):
    bad = signed_kit.build("echo", folder="bad", tampered=True)
    command = [sys.executable, "-m", "archiver.integrations.kserve", "--model_dir", str(bad.parent)]
    command += ["--trusted_key", str(signed_kit.public)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("model-archiver kserve: error: echo.mar was changed after it was signed")
    assert "Traceback" not in proc.stderr

    good = signed_kit.build("echo", folder="good")
    engine = kit.start_kserve(signed_kit.tmp, good.parent, extra=("--trusted_key", str(signed_kit.public)))
    try:
        reply = kit.http(
            "POST",
            f"{engine.url}/v1/models/echo:predict",
            json.dumps({"instances": ["hi"]}).encode(),
            {"Content-Type": "application/json"},
        )
        assert reply.status == 200, reply.body
        assert reply.json()["predictions"] == [{"echo": "hi", "signed": True}]
    finally:
        engine.stop()


def test_a_ray_replica_refuses_a_tampered_archive_before_loading_it(signed_kit):
    # The replica class Ray instantiates on each node, made here as Ray would: the archive was fine
    # when the application was built, and was changed before this replica started.
    from archiver.errors import TamperedArchiveError
    from archiver.integrations.archive_plan import plan_archive
    from archiver.integrations.ray_serve import ArchiveModel

    mar = signed_kit.build("echo")
    plan = plan_archive(mar)
    data = bytearray(mar.read_bytes())
    data[len(data) // 2] ^= 0x01
    mar.write_bytes(bytes(data))
    with pytest.raises(TamperedArchiveError, match="echo.mar was changed after it was signed"):
        ArchiveModel(plan, None, 0, [signed_kit.public.read_text()])


def _unsigned_twin(signed_kit, name: str) -> Path:
    """Another, unsigned archive of model ``name``: what someone with write access swaps in."""
    evil = signed_kit.tmp / "evil"
    evil.mkdir(exist_ok=True)
    (evil / "echo_handler.py").write_text(ECHO.replace('"signed": True', '"signed": "pwned"'))
    return Path(
        build_archive(model_name=name, version="1.0", handler=str(evil / "echo_handler.py"), export_path=evil)
    )


def test_a_ray_replica_loads_only_the_bytes_it_verified(signed_kit, monkeypatch):
    # The replica checks the signature, then loads: an archive swapped in between (its old signature
    # beside it) must be refused by the load, not run.
    from archiver.errors import TamperedArchiveError
    from archiver.integrations import ray_serve, signatures
    from archiver.integrations.archive_plan import plan_archive

    mar = signed_kit.build("echo")
    twin = _unsigned_twin(signed_kit, "echo")
    check = signatures.check_archive

    def check_then_swap(source, keys):
        verified = check(source, keys)  # the real check, on the signed bytes
        mar.write_bytes(twin.read_bytes())  # the race: the store changes before the load
        return verified

    monkeypatch.setattr(ray_serve.signatures, "check_archive", check_then_swap)
    # Outside a replica, ray.get_gpu_ids() would start a whole local Ray instance to say "none".
    monkeypatch.setattr(ray_serve, "_ray_gpu_id", lambda plan: None)
    with pytest.raises(TamperedArchiveError, match="echo.mar changed after its signature was verified"):
        ray_serve.ArchiveModel(
            plan_archive(mar), str(signed_kit.tmp / "cache"), 0, [signed_kit.public.read_text()]
        )


def test_the_kserve_runtime_loads_only_the_bytes_it_verified(signed_kit):
    # KServe checks every archive (build_models) before loading any (load()): a swap in between is refused.
    from archiver.errors import TamperedArchiveError
    from archiver.integrations import kserve, signatures

    mar = signed_kit.build("echo")
    keys = signatures.trusted_keys([str(signed_kit.public)])
    [model] = kserve.build_models(mar.parent, None, str(signed_kit.tmp / "cache"), keys)
    mar.write_bytes(_unsigned_twin(signed_kit, "echo").read_bytes())
    with pytest.raises(TamperedArchiveError, match="echo.mar changed after its signature was verified"):
        model.load()
    assert model.loaded is None and not model.ready


@pytest.mark.slow
def test_ray_refuses_a_tampered_archive_and_serves_a_signed_one(signed_kit, kit):
    good = signed_kit.build("echo", folder="good")
    bad = signed_kit.build("evil", folder="bad", tampered=True)
    keys = [signed_kit.public.read_text()]
    apps = [
        {"name": name, "route_prefix": prefix, "import_path": "archiver.integrations.ray_serve:build_app",
         "args": {"archives": [str(mar)], "trusted_keys": keys}}
        for name, prefix, mar in (("good", "/good", good), ("bad", "/bad", bad))
    ]  # fmt: skip
    engine = kit.start_ray(signed_kit.tmp, {"applications": apps}, wait=False)
    try:
        ping = engine.url + "/good/ping"
        kit.wait_for(lambda: _answers(kit, ping), 300, "the signed archive's app", engine.proc, engine.log)
        reply = kit.http("POST", engine.url + "/good/predictions/echo", b"hi", {"Content-Type": "text/plain"})
        assert reply.status == 200 and reply.json() == {"echo": "hi", "signed": True}
        refusal = "evil.mar was changed after it was signed"
        kit.wait_for(lambda: refusal in engine.log.read_text(errors="replace"), 120, "the replica's refusal",
                     None, engine.log)  # fmt: skip
        assert kit.http("POST", engine.url + "/bad/predictions/evil", b"hi").status != 200
    finally:
        engine.stop()


def _answers(kit, url: str) -> bool:
    try:
        return kit.http("GET", url, timeout=3).status == 200
    except OSError:
        return False
