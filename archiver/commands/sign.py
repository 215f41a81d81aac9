"""The ``sign`` command: write an archive's signature (OpenSSF model-signing format) beside it."""

from __future__ import annotations

from pathlib import Path

import click

from archiver.commands.options import (
    archive_argument,
    certificate_chain_option,
    key_file_option,
    signature_option,
)
from archiver.errors import UsageError


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@archive_argument(exists=True)
@key_file_option(
    "--private-key", "An EC private key (P-256, P-384 or P-521, PEM, unencrypted). Offline: no network."
)
@signature_option("Where to write the signature.  [default: ARCHIVE.sig beside it]")
@key_file_option(
    "--certificate",
    "With --private-key: sign as this X.509 certificate's holder (certificate mode, offline).",
)
@certificate_chain_option("With --certificate: the intermediate certificates (repeatable).")
@click.option(
    "--sigstore",
    is_flag=True,
    help="Sign keylessly with Sigstore (needs a network: an OpenID Connect login, Fulcio and Rekor).",
)
@click.option("--identity-token", envvar="SIGSTORE_ID_TOKEN", help="With --sigstore: an OIDC token (or env).")
def sign(
    archive_path: str,
    private_key: str | None,
    signature_path: str | None,
    certificate: str | None,
    certificate_chain: tuple[str, ...],
    sigstore: bool,
    identity_token: str | None,
) -> None:
    """Sign ARCHIVE (a .mar, .tar.gz or folder archive) in the OpenSSF model-signing format.

    The signature (a Sigstore bundle) goes to ARCHIVE.sig; 'model_signing verify key' accepts it, and
    'model-archiver verify --public-key' and 'serve --trusted-key' check it. Certificate and Sigstore
    signatures verify with 'model-archiver verify', not with 'serve --trusted-key'.

    \b
    openssl ecparam -name prime256v1 -genkey -noout -out key.pem
    openssl ec -in key.pem -pubout -out key.pub
    model-archiver sign resnet34.mar --private-key key.pem
    """
    from archiver import signing, signing_modes

    if sigstore:
        if private_key or certificate:
            raise UsageError("--sigstore signs without a key: drop --private-key and --certificate")
        written = signing_modes.sign_sigstore(archive_path, signature_path, identity_token=identity_token)
    elif private_key is None:
        raise UsageError("give --private-key KEY.pem (or --sigstore for keyless signing)")
    elif certificate:
        written = signing_modes.sign_certificate(
            archive_path, private_key, certificate, list(certificate_chain), signature_path
        )
    else:
        if certificate_chain:
            raise UsageError("--certificate-chain goes with --certificate")
        written = signing.sign(archive_path, private_key, signature_path)
    click.echo(f"signed {archive_path}: {written}")


def sign_after_build(archive: Path, private_key: str) -> Path:
    """``model-archiver --sign-key``: the archive is written (atomically) first, then its signature."""
    from archiver import signing

    return signing.sign(archive, private_key)
