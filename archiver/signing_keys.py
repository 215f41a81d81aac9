"""Keys for archive signatures: read trusted public keys and name each by its fingerprint.

A key is an elliptic-curve key (P-256, P-384 or P-521), the kinds OpenSSF model signing accepts. Its
fingerprint is the sha256, in hex, of its SubjectPublicKeyInfo in PEM form: the ``hint`` every
model-signing bundle records, so a refusal can name the key that did sign, and ``openssl pkey -pubin
-in key.pub | sha256sum`` prints the same. Only ``cryptography`` is imported, and only when called.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archiver.errors import InputFileError, MissingExtraError, UsageError

CURVES = ("secp256r1", "secp384r1", "secp521r1")


@dataclass(frozen=True)
class TrustedKey:
    """A public key an archive's signature may be made with, and its fingerprint."""

    fingerprint: str
    pem: bytes  # the key as given (a file's bytes, or text from a config)
    label: str  # where it came from, for messages: a path, or "trusted key 2"


def key_fingerprint(public_key: Any) -> str:
    """The sha256 (hex) of an EC public key's SubjectPublicKeyInfo in PEM: model-signing's key ``hint``."""
    from cryptography.hazmat.primitives import serialization

    pem = public_key.public_bytes(
        encoding=serialization.Encoding.PEM, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(pem).hexdigest()


def load_public_key(pem: bytes, label: str) -> Any:
    """An EC public key (P-256/384/521) from PEM; UsageError saying what is wrong with it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        hint = " (that is a private key: give its .pub)" if b"PRIVATE KEY" in pem else ""
        raise UsageError(f"{label} is not a PEM public key{hint}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in CURVES:
        raise UsageError(f"{label} is not an elliptic-curve P-256, P-384 or P-521 public key")
    return key


def read_trusted_keys(items: Iterable[str | Path]) -> tuple[TrustedKey, ...]:
    """Each item a public key file's path, or a key's PEM text itself (as a Ray config or KServe
    ConfigMap carries it); duplicates are kept once."""
    require_signing_extra()
    keys: dict[str, TrustedKey] = {}
    for number, item in enumerate(items, 1):
        text = str(item)
        if text.lstrip().startswith("-----BEGIN"):
            pem, label = text.encode("ascii", "replace"), f"trusted key {number}"
        else:
            try:
                pem, label = Path(text).expanduser().read_bytes(), text
            except OSError as exc:
                raise InputFileError(f"cannot read the trusted key {text}: {exc.strerror}") from None
        fingerprint = key_fingerprint(load_public_key(pem, label))
        keys.setdefault(fingerprint, TrustedKey(fingerprint, pem, label))
    return tuple(keys.values())


def check_private_key(path: Path) -> None:
    """Check ``path`` is an unencrypted EC private key before model-signing reads it (its own errors
    for an RSA key or an encrypted one are an AttributeError and a TypeError)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"cannot read the private key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise UsageError(f"{path} is encrypted: give an unencrypted EC private key") from None
    except ValueError:
        raise UsageError(f"{path} is not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in CURVES:
        raise UsageError(f"{path} is not an elliptic-curve P-256, P-384 or P-521 private key")


def require_signing_extra() -> None:
    """MissingExtraError (one line, naming the extra) unless ``model-signing`` is installed."""
    try:
        import model_signing  # noqa: F401
    except ImportError:
        raise MissingExtraError(
            "signing needs the optional 'signing' extra, which is not installed: "
            "pip install 'torchmar[signing]'"
        ) from None
