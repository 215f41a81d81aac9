"""Certificate and Sigstore (keyless) signatures: model-signing's other modes, for ``sign`` and ``verify``.

Key signatures (``archiver/signing.py``) are what a server trusts; these two modes are offered to the
command line as model-signing offers them, through its public API. Certificate mode is offline (a
private key plus its X.509 certificate and chain). Sigstore mode needs a network: signing logs in
through OpenID Connect and asks Fulcio for a short-lived certificate and Rekor to log it; verifying
fetches Sigstore's trust root. Their failures come as one line from model-signing's own message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from archiver.errors import ArchiverError, InputFileError, MissingSignatureError, SignatureError
from archiver.signing import check_outside, hashing_config, signature_path_for, write_signature
from archiver.signing_keys import check_private_key, require_signing_extra


def sign_certificate(
    archive: str | Path,
    private_key: str | Path,
    certificate: str | Path,
    chain: list[str],
    signature_path: str | Path | None = None,
) -> Path:
    """Sign as the holder of ``certificate`` (its key is ``private_key``); offline."""
    require_signing_extra()
    check_private_key(Path(private_key))
    from model_signing import signing

    config = signing.Config().use_certificate_signer(
        private_key=private_key, signing_certificate=certificate, certificate_chain=chain
    )
    return _sign(config, archive, signature_path)


def sign_sigstore(
    archive: str | Path, signature_path: str | Path | None = None, *, identity_token: str | None = None
) -> Path:
    """Sign keylessly with Sigstore's public instance (network: OIDC login, Fulcio, Rekor)."""
    require_signing_extra()
    from model_signing import signing

    config = signing.Config().use_sigstore_signer(identity_token=identity_token)
    return _sign(config, archive, signature_path)


def _sign(config: Any, archive: str | Path, signature_path: str | Path | None) -> Path:
    archive = Path(archive)
    if not archive.exists():
        raise InputFileError(f"{archive}: no such file or folder")
    config.set_hashing_config(hashing_config())
    target = Path(signature_path) if signature_path else signature_path_for(archive)
    check_outside(archive, target)
    try:
        return write_signature(lambda tmp: config.sign(archive, tmp), target)
    except ArchiverError:
        raise
    except Exception as exc:  # noqa: BLE001 - model-signing and sigstore raise many types; one line each
        raise ArchiverError(f"signing {archive.name} failed: {_line(exc)}") from None


def verify_certificate(
    archive: str | Path, chain: list[str], signature_path: str | Path | None = None
) -> None:
    """Check a certificate-mode signature against ``chain`` (the root and intermediates); offline."""
    require_signing_extra()
    from model_signing import verifying

    _verify(verifying.Config().use_certificate_verifier(certificate_chain=chain), archive, signature_path)


def verify_sigstore(
    archive: str | Path, identity: str, issuer: str, signature_path: str | Path | None = None
) -> None:
    """Check a Sigstore signature made by ``identity`` (an e-mail or workflow) at ``issuer`` (network)."""
    require_signing_extra()
    from model_signing import verifying

    config = verifying.Config().use_sigstore_verifier(identity=identity, oidc_issuer=issuer)
    _verify(config, archive, signature_path)


def _verify(config: Any, archive: str | Path, signature_path: str | Path | None) -> None:
    archive = Path(archive)
    sig = Path(signature_path) if signature_path else signature_path_for(archive)
    if not sig.is_file():
        raise MissingSignatureError(f"{archive.name} has no signature: {sig} does not exist")
    try:
        config.verify(archive, sig)
    except Exception as exc:  # noqa: BLE001 - model-signing raises ValueError and others alike
        raise SignatureError(f"{archive.name}: the signature does not verify: {_line(exc)}") from None


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "…") if len(text) > 300 else (text or type(exc).__name__)
