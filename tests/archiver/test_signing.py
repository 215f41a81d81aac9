"""Signing archives and checking signatures from the command line, and with model-signing's own CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from archiver.build import build_archive
from archiver.cli import main

MODEL_SIGNING = str(Path(sys.executable).parent / "model_signing")


def openssl_fingerprint(public_key: Path) -> str:
    """The fingerprint as the docs tell a user to compute it: openssl pkey -pubin -in KEY | sha256sum."""
    pem = subprocess.run(
        ["openssl", "pkey", "-pubin", "-in", str(public_key)], capture_output=True, check=True
    ).stdout
    return hashlib.sha256(pem).hexdigest()


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as caught:
        main(args)
    out, err = capsys.readouterr()
    return caught.value.code, out, err


@pytest.fixture
def keys(tmp_path: Path, ec_key_pair) -> dict[str, Path]:
    folder = tmp_path / "keys"
    folder.mkdir()
    ours, ours_pub = ec_key_pair(folder, "ours")
    other, other_pub = ec_key_pair(folder, "other", "P-384")
    return {"private": ours, "public": ours_pub, "other": other, "other_pub": other_pub}


@pytest.fixture
def mar(model_inputs) -> Path:
    return Path(build_archive(**model_inputs.build_kwargs()))


def signed(mar: Path, keys: dict[str, Path], capsys) -> Path:
    code, out, err = run_main(["sign", str(mar), "--private-key", str(keys["private"])], capsys)
    assert (code, err) == (0, ""), err
    sig = mar.with_name(mar.name + ".sig")
    assert f"signed {mar}: {sig}" in out
    return sig


def test_a_signed_archive_verifies_with_the_signers_fingerprint(mar, keys, capsys):
    signed(mar, keys, capsys)
    code, out, err = run_main(["verify", str(mar), "--public-key", str(keys["public"])], capsys)
    assert (code, err) == (0, "")
    fingerprint = openssl_fingerprint(keys["public"])
    assert out.strip().endswith(f"all sha256 match; signed by key {fingerprint})")
    code, out, _ = run_main(["verify", str(mar), "--public-key", str(keys["public"]), "--json"], capsys)
    assert code == 0 and json.loads(out)["signedBy"] == f"key {fingerprint}"
    # no temp file of the atomic write is left beside the archive, and others may read the signature
    assert sorted(p.name for p in mar.parent.iterdir()) == ["tiny.mar", "tiny.mar.sig"]
    assert mar.with_name("tiny.mar.sig").stat().st_mode & 0o777 == 0o644


def test_archive_signs_at_build_time_with_sign_key(model_inputs, keys, capsys):
    kwargs = model_inputs.build_kwargs()
    args = ["--model-name", "tiny", "-v", "1.0", "--handler", kwargs["handler"]]
    args += ["--serialized-file", kwargs["serialized_file"], "--export-path", kwargs["export_path"]]
    code, out, err = run_main([*args, "--sign-key", str(keys["private"])], capsys)
    assert (code, err) == (0, "")
    mar = Path(kwargs["export_path"]) / "tiny.mar"
    assert out.splitlines() == [str(mar), f"{mar}.sig"]
    assert run_main(["verify", str(mar), "--public-key", str(keys["public"])], capsys)[0] == 0
    # a bad key is refused before anything is written
    code, _, err = run_main([*args, "-f", "--sign-key", str(keys["public"])], capsys)
    assert code == 2 and "is not a PEM private key" in err


def test_model_signing_cli_verifies_ours(mar, keys, capsys):
    sig = signed(mar, keys, capsys)
    proc = subprocess.run(
        [
            MODEL_SIGNING,
            "verify",
            "key",
            str(mar),
            "--signature",
            str(sig),
            "--public_key",
            str(keys["public"]),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Verification succeeded" in proc.stdout


def test_ours_verifies_what_model_signing_cli_signed(mar, keys, capsys):
    sig = mar.with_name("elsewhere.sig")
    proc = subprocess.run(
        [
            MODEL_SIGNING,
            "sign",
            "key",
            str(mar),
            "--private_key",
            str(keys["private"]),
            "--signature",
            str(sig),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    args = ["verify", str(mar), "--public-key", str(keys["public"]), "--signature", str(sig)]
    code, out, err = run_main(args, capsys)
    assert (code, err) == (0, "")
    assert f"signed by key {openssl_fingerprint(keys['public'])}" in out


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def refusal(args: list[str], capsys) -> str:
    """The one line a refused `verify` prints (exit 1, no traceback)."""
    code, out, err = run_main(args, capsys)
    assert code == 1, (out, err)
    assert "Traceback" not in err and "site-packages" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_each_bad_signature_is_refused_with_its_own_message(mar, keys, model_inputs, capsys, tmp_path):
    sig = signed(mar, keys, capsys)
    verify = ["verify", str(mar), "--public-key", str(keys["public"])]
    messages = {}

    # one flipped byte in the archive (inside the weights, which the manifest hashes too)
    good = mar.read_bytes()
    flip_byte(mar, len(good) // 2)
    messages["tampered"] = refusal(verify, capsys)
    mar.write_bytes(good)

    # a signature by another key
    run_main(["sign", str(mar), "--private-key", str(keys["other"])], capsys)
    messages["other key"] = refusal(verify, capsys)
    run_main(["sign", str(mar), "--private-key", str(keys["private"])], capsys)

    # no signature, then a truncated one
    whole = sig.read_bytes()
    sig.unlink()
    messages["missing"] = refusal(verify, capsys)
    sig.write_bytes(whole[: len(whole) // 2])
    messages["truncated"] = refusal(verify, capsys)

    # the signature of another archive
    other = Path(
        build_archive(**model_inputs.build_kwargs(model_name="other", export_path=str(tmp_path / "o")))
    )
    run_main(["sign", str(other), "--private-key", str(keys["private"])], capsys)
    args = [*verify, "--signature", str(other) + ".sig"]
    messages["other archive"] = refusal(args, capsys)

    # a signature whose bytes were altered after signing
    bundle = json.loads(whole)
    envelope = bundle["dsseEnvelope"]["signatures"][0]
    envelope["sig"] = ("A" if envelope["sig"][0] != "A" else "B") + envelope["sig"][1:]
    sig.write_text(json.dumps(bundle))
    messages["altered"] = refusal(verify, capsys)

    assert "tiny.mar was changed after it was signed" in messages["tampered"]
    assert "is signed by another key" in messages["other key"]
    assert "tiny.mar has no signature: tiny.mar.sig is not beside it" in messages["missing"]
    assert "tiny.mar.sig is not an OpenSSF model-signing bundle (not JSON" in messages["truncated"]
    assert "other.mar.sig is the signature of another archive ('other.mar')" in messages["other archive"]
    assert "the signature file was altered after signing" in messages["altered"]
    assert len(set(messages.values())) == len(messages)


def test_a_folder_archive_is_signed_file_by_file_and_a_changed_file_is_named(model_inputs, keys, capsys):
    folder = Path(build_archive(**model_inputs.build_kwargs(archive_format="no-archive")))
    assert folder.is_dir()
    inside = [
        "sign",
        str(folder),
        "--private-key",
        str(keys["private"]),
        "--signature",
        str(folder / "x.sig"),
    ]
    code, _, err = run_main(inside, capsys)
    assert code == 2 and "outside it" in err and not (folder / "x.sig").exists()
    signed(folder, keys, capsys)
    verify = ["verify", str(folder), "--public-key", str(keys["public"])]
    assert run_main(verify, capsys)[0] == 0
    (folder / "index_to_name.json").write_text('{"0": "dog", "1": "cat"}\n')
    assert "tiny: index_to_name.json was changed after it was signed" in refusal(verify, capsys)
    (folder / "index_to_name.json").write_text('{"0": "cat", "1": "dog"}\n')
    (folder / "extra.py").write_text("import os\n")
    assert "extra.py is not covered by the signature" in refusal(verify, capsys)
    (folder / "extra.py").unlink()
    (folder / "linked.py").symlink_to(folder / "index_to_name.json")  # model-signing cannot hash a link
    line = refusal(verify, capsys)
    assert "Cannot use 'tiny/linked.py'" in line and str(folder.parent) not in line


def test_keys_that_cannot_sign_or_verify_are_usage_errors(mar, keys, capsys, tmp_path):
    rsa_key = tmp_path / "rsa.pem"
    rsa_key.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    code, _, err = run_main(["sign", str(mar), "--private-key", str(rsa_key)], capsys)
    assert code == 2 and "is not an elliptic-curve P-256, P-384 or P-521 private key" in err
    signed(mar, keys, capsys)
    code, _, err = run_main(["verify", str(mar), "--public-key", str(keys["private"])], capsys)
    assert code == 2 and "is not a PEM public key (that is a private key: give its .pub)" in err
    code, _, err = run_main(["sign", str(mar)], capsys)
    assert code == 2 and "give --private-key KEY.pem" in err


def test_sign_and_verify_through_the_console_script(mar, keys):
    script = Path(sys.executable).parent / "model-archiver"
    run = [str(script), "sign", str(mar), "--private-key", str(keys["private"])]
    assert subprocess.run(run, capture_output=True).returncode == 0
    flip_byte(mar, 100)
    proc = subprocess.run(
        [str(script), "verify", str(mar), "--public-key", str(keys["public"])], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("model-archiver: error: tiny.mar was changed after it was signed")


def write_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """(leaf private key, leaf certificate, CA certificate): a CA of our own that issued a signing cert."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    unused = ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement", "crl_sign")
    usage = {k: False for k in (*unused, "encipher_only", "decipher_only")}
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, key_cert_sign=True, **usage), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "builder")]))
        .issuer_name(ca_name).public_key(leaf_key.public_key()).serial_number(2)
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, **usage), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key_path, leaf_path, ca_path = folder / "leaf.pem", folder / "leaf.crt", folder / "ca.crt"
    key_path.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    leaf_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return key_path, leaf_path, ca_path


def test_certificate_mode_signs_and_verifies_offline(mar, capsys, tmp_path):
    key, leaf, ca = write_certificates(tmp_path)
    args = [
        "sign",
        str(mar),
        "--private-key",
        str(key),
        "--certificate",
        str(leaf),
        "--certificate-chain",
        str(ca),
    ]
    code, _, err = run_main(args, capsys)
    assert (code, err) == (0, "")
    code, out, err = run_main(["verify", str(mar), "--certificate-chain", str(ca)], capsys)
    assert (code, err) == (0, "") and "signed by a certificate of the given chain" in out
    flip_byte(mar, 100)
    assert "tiny.mar: the signature does not verify" in refusal(
        ["verify", str(mar), "--certificate-chain", str(ca)], capsys
    )


def test_an_archive_reached_through_a_symlink_verifies_under_the_name_it_was_given(
    mar, keys, capsys, tmp_path
):
    signed(mar, keys, capsys)
    (tmp_path / "link").symlink_to(mar.parent, target_is_directory=True)
    linked = tmp_path / "link" / mar.name
    code, out, err = run_main(["verify", str(linked), "--public-key", str(keys["public"])], capsys)
    assert (code, err) == (0, ""), err
    assert out.startswith(f"OK: {linked} ")
    (tmp_path / "alias.mar").symlink_to(mar)  # the archive itself a link; its signature given
    sig = str(mar) + ".sig"
    args = ["verify", str(tmp_path / "alias.mar"), "--public-key", str(keys["public"]), "--signature", sig]
    code, out, err = run_main(args, capsys)
    assert (code, err) == (0, ""), err
    flip_byte(mar, mar.stat().st_size // 2)  # and a change behind the link is still found
    line = refusal(["verify", str(linked), "--public-key", str(keys["public"])], capsys)
    assert f"{mar.name} was changed after it was signed" in line
    assert "alias.mar was changed after it was signed" in refusal(args, capsys)  # the name given


def test_a_signature_hashed_in_shards_verifies_but_is_not_accepted_for_loading(mar, keys):
    # model-signing can hash a file in shards: verify says whether it holds, but whatever loads the
    # archive next needs the whole file's sha256 from the same read, and refuses such a signature.
    from model_signing import hashing, signing

    from archiver.errors import UnpinnableSignatureError
    from archiver.signing import verify
    from archiver.signing_keys import read_trusted_keys

    config = signing.Config().use_elliptic_key_signer(private_key=keys["private"])
    config.set_hashing_config(hashing.Config().use_shard_serialization(shard_size=1024))
    config.sign(mar, mar.with_name("tiny.mar.sig"))
    trusted = read_trusted_keys([keys["public"]])
    assert verify(mar, trusted).sha256 is None  # checked, but nothing to pin a load to
    with pytest.raises(UnpinnableSignatureError, match="tiny.mar.sig hashes tiny.mar in shards, not as one"):
        verify(mar, trusted, allow_folder=False)
    signed_whole = signing.Config().use_elliptic_key_signer(private_key=keys["private"])
    signed_whole.sign(mar, mar.with_name("tiny.mar.sig"))  # model-signing's default: one sha256
    assert verify(mar, trusted, allow_folder=False).sha256 == hashlib.sha256(mar.read_bytes()).hexdigest()


def test_a_vanished_archive_is_named_without_its_folder(mar, keys, tmp_path):
    # this message can reach a register call's answer, which must not show where the store is
    from archiver.errors import InputFileError
    from archiver.signing import verify
    from archiver.signing_keys import read_trusted_keys

    gone = tmp_path / "store-path-secret" / "gone.mar"
    with pytest.raises(InputFileError) as caught:
        verify(gone, read_trusted_keys([keys["public"]]), allow_folder=False)
    assert caught.value.message == "gone.mar: no such file or folder"
