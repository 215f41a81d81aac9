"""The ``inspect`` and ``verify`` commands: what is in an archive, and whether it is intact."""

from __future__ import annotations

import io
import json
import sys
import zipfile
from pathlib import Path

import click

from archiver.commands.options import (
    archive_argument,
    certificate_chain_option,
    public_key_option,
    signature_option,
)
from archiver.errors import UsageError
from archiver.manifest import MANIFEST_PATH
from archiver.pt2 import Pt2Info, read_pt2_info
from archiver.reader import ArchiveReader, VerifyReport, open_archive

# A .tar.gz member cannot be opened in place; past this size its .pt2 kind is not read into memory.
_TGZ_KIND_LIMIT_BYTES = 256 << 20


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@archive_argument()
@click.option("--json", "as_json", is_flag=True, help="Print the manifest, files and check results as JSON.")
def inspect(archive_path: str, as_json: bool) -> None:
    """Show an archive's manifest and files with sizes and sha256; exit 1 if it is not intact.

    The sha256 shown is computed from the bytes; a file whose bytes disagree with the manifest is flagged.
    A .pt2 serialized file is named by kind (torch.export program or AOTInductor package, read from its
    contents); ARCHIVE may also be a .pt2 file itself.
    """
    if Path(archive_path).is_file() and (info := read_pt2_info(archive_path)) is not None:
        _print_pt2(archive_path, info, as_json)
        return
    with open_archive(archive_path) as reader:
        report = reader.verify()
        rows = _rows(reader, report)
        kind = _serialized_kind(reader)
        if as_json:
            doc = {
                "path": str(reader.path),
                "format": reader.format,
                "has_hashes": reader.has_hashes,
                "ok": report.ok,
                "problems": report.problems,
                "manifest": reader.manifest.to_dict(),
                "serialized_kind": _kind_doc(kind),
                "files": rows,
            }
            click.echo(json.dumps(doc, indent=2))
        else:
            _print_summary(reader)
            if kind is not None:
                click.echo(f"{'serialized kind:':<18}{kind.describe()}")
            _print_table(rows)
            _print_findings(report)
    if not report.ok:
        sys.exit(1)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@archive_argument()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@public_key_option(
    "Also check ARCHIVE's signature was made with this EC public key (repeatable: any of them)."
)
@signature_option("The signature file.  [default: ARCHIVE.sig beside it]")
@certificate_chain_option(
    "Check a certificate-mode signature against these certificates (root first; repeatable)."
)
@click.option(
    "--sigstore-identity",
    metavar="IDENTITY",
    help="Check a Sigstore signature by this identity (needs a network; with --sigstore-issuer).",
)
@click.option("--sigstore-issuer", metavar="URL", help="The OIDC issuer of --sigstore-identity.")
def verify(
    archive_path: str,
    as_json: bool,
    public_keys: tuple[str, ...],
    signature_path: str | None,
    certificate_chain: tuple[str, ...],
    sigstore_identity: str | None,
    sigstore_issuer: str | None,
) -> None:
    """Check an archive's structure, manifest, handler and every file's sha256. Exit 0 if intact, else 1.

    With --public-key (or --certificate-chain, --sigstore-identity) the signature is checked first
    (OpenSSF model-signing format, ARCHIVE.sig): a refusal is one line saying what failed.
    """
    signed = _check_signature(
        archive_path, public_keys, signature_path, certificate_chain, sigstore_identity, sigstore_issuer
    )
    with open_archive(archive_path) as reader:
        report = reader.verify()
        count = len(reader.files())
    if as_json:
        doc = {
            "ok": report.ok,
            "has_hashes": report.has_hashes,
            "problems": report.problems,
            "notes": report.notes,
            "signedBy": signed,
        }
        click.echo(json.dumps(doc, indent=2))
    else:
        _print_findings(report)
        detail = f"{count} files, all sha256 match" if report.has_hashes and report.ok else f"{count} files"
        detail += f"; signed by {signed}" if signed else ""
        click.echo(f"{'OK' if report.ok else 'FAILED'}: {archive_path} ({detail})")
    if not report.ok:
        sys.exit(1)


def _check_signature(
    archive: str,
    public_keys: tuple[str, ...],
    signature: str | None,
    chain: tuple[str, ...],
    identity: str | None,
    issuer: str | None,
) -> str | None:
    """Who signed ``archive`` (a key's fingerprint, or the mode), None when no check was asked for;
    a SignatureError (exit 1, one line) when it does not verify."""
    modes = sum(bool(x) for x in (public_keys, chain, identity or issuer))
    if modes > 1:
        raise UsageError(
            "check one kind of signature: --public-key, --certificate-chain or --sigstore-identity"
        )
    if signature and not modes:
        raise UsageError("--signature needs --public-key (or --certificate-chain, --sigstore-identity)")
    if public_keys:
        from archiver.signing import verify as verify_signature
        from archiver.signing_keys import read_trusted_keys

        check = verify_signature(archive, read_trusted_keys(public_keys), signature)
        return f"key {check.fingerprint}"
    from archiver import signing_modes

    if chain:
        signing_modes.verify_certificate(archive, list(chain), signature)
        return "a certificate of the given chain"
    if identity or issuer:
        if not (identity and issuer):
            raise UsageError("--sigstore-identity and --sigstore-issuer go together")
        signing_modes.verify_sigstore(archive, identity, issuer, signature)
        return f"Sigstore identity {identity}"
    return None


def _print_pt2(path: str, info: Pt2Info, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"path": path, "serialized_kind": _kind_doc(info)}, indent=2))
    else:
        click.echo(f"{path}: {info.describe()}")


def _kind_doc(info: Pt2Info | None) -> dict | None:
    if info is None:
        return None
    return {
        "kind": info.kind,
        "description": info.describe(),
        "max_batch": info.max_batch,
        "metadata": info.metadata,
    }


def _serialized_kind(reader: ArchiveReader) -> Pt2Info | None:
    """The .pt2 kind of the manifest's serializedFile, read in place; None when it is not a .pt2."""
    name = reader.manifest.serialized_file
    if not name or name not in reader.files():
        return None
    if reader.path.is_dir():
        return read_pt2_info(reader.path / name)
    if zipfile.is_zipfile(reader.path):
        with zipfile.ZipFile(reader.path) as outer, outer.open(name) as member:
            return read_pt2_info(member)
    if reader.size(name) > _TGZ_KIND_LIMIT_BYTES:
        return None
    return read_pt2_info(io.BytesIO(reader.read(name)))


def _rows(reader: ArchiveReader, report: VerifyReport) -> list[dict]:
    records = reader.manifest.files or {}
    rows = []
    for name in reader.files():
        computed = report.sha256.get(name)
        record = records.get(name)
        if name == MANIFEST_PATH:
            status = "manifest"
        elif record is None:
            status = "unrecorded" if reader.has_hashes else "no hash recorded"
        else:
            status = "ok" if computed == record.sha256 else "MISMATCH"
        rows.append({"name": name, "size": reader.size(name), "sha256": computed, "status": status})
    return rows


def _print_summary(reader: ArchiveReader) -> None:
    manifest = reader.manifest
    model = manifest.to_dict()["model"]
    lines = [
        ("archive", f"{reader.path} ({reader.format})"),
        ("model", f"{manifest.model_name} version {manifest.model_version or '-'}"),
        ("handler", manifest.handler),
        *(
            (key, model[key])
            for key in ("serializedFile", "modelFile", "requirementsFile", "configFile")
            if key in model
        ),
        ("runtime", manifest.runtime),
        ("created", f"{manifest.created_on or '-'} by archiver {manifest.archiver_version or '-'}"),
    ]
    for label, value in lines:
        click.echo(f"{label + ':':<18}{value}")


def _print_table(rows: list[dict]) -> None:
    width = max(len("file"), *(len(r["name"]) for r in rows))
    click.echo("")
    click.echo(f"{'file':<{width}}  {'size':>13}  {'sha256':<64}  check")
    for row in rows:
        click.echo(f"{row['name']:<{width}}  {row['size']:>13,}  {row['sha256'] or '-':<64}  {row['status']}")
    click.echo("")


def _print_findings(report: VerifyReport) -> None:
    for note in report.notes:
        click.echo(f"note: {note}")
    for problem in report.problems:
        click.echo(f"problem: {problem}")
