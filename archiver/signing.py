"""Sign an archive and check its signature (OpenSSF model-signing format) before anything loads it.

A signature is a Sigstore bundle written beside the archive as ``ARCHIVE.sig`` by ``model-signing``
(the ``signing`` extra, pinned to 1.1.1): the same file its ``model_signing sign key`` command writes,
so each side verifies the other's. Signing is offline, with an elliptic-curve key (P-256/384/521).

``verify`` tells the ways a check fails apart, one error type each (``archiver/errors.py``): no
signature, a file that is not a bundle, another key, an altered signature, an archive changed since it
was signed (naming the file of a folder archive), a signature made for another archive. To tell them
apart it reads the bundle and checks the key with ``model_signing._signing``'s pieces, one step at a
time, where the public ``verifying.Config.verify`` would raise one ``ValueError`` for all of them; the
pin to 1.1.1 keeps those private modules still.

Keys and their fingerprints are ``signing_keys``'s. ``model_signing`` is imported only when a signature
is made or checked: ``import archiver`` and a server without trusted keys never load it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archiver.errors import (
    InputFileError,
    MalformedSignatureError,
    MissingSignatureError,
    SignatureError,
    TamperedArchiveError,
    UnpinnableSignatureError,
    UnsignableSourceError,
    UntrustedSignerError,
    UsageError,
    WrongArchiveSignatureError,
)
from archiver.signing_keys import TrustedKey, check_private_key, load_public_key, require_signing_extra

SIGNATURE_SUFFIX = ".sig"
_SHOWN = 16  # hex digits of a fingerprint or digest quoted in a one-line message


@dataclass(frozen=True)
class SignatureCheck:
    """A signature that verified: who signed what."""

    archive: Path
    signature: Path
    fingerprint: str  # the signer's key
    # A file archive's sha256, from the same read that verified it (None for a folder, or a signature
    # hashed another way): what a loader is held to (``load_model(signed_sha256=…)``).
    sha256: str | None


def signature_path_for(archive: str | Path) -> Path:
    """``ARCHIVE.sig``, beside the archive (beside a folder archive, not inside it)."""
    path = Path(archive)
    return path.with_name(path.name + SIGNATURE_SUFFIX)


def short(hex_digest: str) -> str:
    return hex_digest[:_SHOWN] + "…"


def hashing_config() -> Any:
    """model-signing's file-by-file sha256, ignoring nothing: a folder's .git files are signed too, so
    that a folder verifies with exactly the files it loads from."""
    from model_signing import hashing

    return hashing.Config().set_ignored_paths(paths=[], ignore_git_paths=False)


# ---- signing ------------------------------------------------------------------------------------------
def sign(archive: str | Path, private_key: str | Path, signature_path: str | Path | None = None) -> Path:
    """Sign ``archive`` (a file or folder) with an EC private key; write the bundle atomically to
    ``signature_path`` (default ``ARCHIVE.sig``) and return its path. Offline: no network."""
    archive, key = Path(archive), Path(private_key)
    require_signing_extra()
    _check_exists(archive)
    check_private_key(key)
    from model_signing import signing

    config = signing.Config().use_elliptic_key_signer(private_key=key).set_hashing_config(hashing_config())
    target = Path(signature_path) if signature_path else signature_path_for(archive)
    check_outside(archive, target)
    hashed = hashed_path(archive)
    return write_signature(lambda tmp: config.sign(hashed, tmp), target)


def hashed_path(archive: Path) -> Path:
    """The path model-signing hashes: a file archive reached through a symlink (the link itself, or a
    linked folder above it) resolved, since model-signing refuses any symlink in a path; a folder
    archive as given, so that a link inside it is still refused."""
    return archive.resolve() if archive.is_file() else archive


def check_outside(archive: Path, target: Path) -> None:
    """A folder's signature cannot go inside it: the folder is hashed while the signature is written."""
    if archive.is_dir() and archive.resolve() in target.resolve().parents:
        raise UsageError(f"put the signature of the folder {archive} outside it, not at {target}")


def write_signature(write: Any, target: str | Path) -> Path:
    """Run ``write(temp_path)`` and move the result to ``target`` atomically (temp file in the same
    folder, fsync, rename), so a reader never finds half a signature."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as stream:
            os.fsync(stream.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the signature from a server run by another user
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _check_exists(archive: Path) -> None:
    if not archive.exists():
        # the name only: this can reach a register call's answer, which must not show the store's path
        raise InputFileError(f"{archive.name}: no such file or folder")


# ---- verifying ----------------------------------------------------------------------------------------
def verify(
    archive: str | Path,
    trusted_keys: Iterable[TrustedKey],
    signature_path: str | Path | None = None,
    *,
    allow_folder: bool = True,
) -> SignatureCheck:
    """Check that ``archive`` is, byte for byte, what one of ``trusted_keys`` signed.

    Raises a ``SignatureError`` subclass naming what failed. ``allow_folder=False`` (a server, a
    replica: whatever loads the archive next) refuses a folder archive before reading anything, and a
    signature that does not give the file's plain sha256: either way there would be nothing to hold
    the load to, and the files could change between this check and the load.
    """
    archive = Path(archive)
    keys = tuple(trusted_keys)
    if not keys:
        raise UsageError("no trusted key to verify with")
    _check_exists(archive)
    if archive.is_dir() and not allow_folder:
        raise UnsignableSourceError(
            f"{archive.name} is a folder archive: with trusted keys only a signed .mar or .tar.gz is "
            "loaded (a folder's files could change after its check)"
        )
    require_signing_extra()
    sig = Path(signature_path) if signature_path is not None else signature_path_for(archive)
    bundle = _read_bundle(archive, sig, beside=signature_path is None)
    key, manifest = _verify_bundle(archive, sig, bundle, keys)
    if not allow_folder:
        _require_plain_sha256(archive, sig, manifest)
    sha256 = _compare(archive, sig, manifest)
    return SignatureCheck(archive=archive, signature=sig, fingerprint=key.fingerprint, sha256=sha256)


def _read_bundle(archive: Path, sig: Path, *, beside: bool) -> Any:
    from model_signing._signing import sign_sigstore_pb

    if not sig.is_file():
        where = f"{sig.name} is not beside it" if beside else f"{sig} does not exist"
        raise MissingSignatureError(
            f"{archive.name} has no signature: {where} (sign it with 'model-archiver sign')"
        )
    try:
        bundle = sign_sigstore_pb.Signature.read(sig).bundle
    except OSError as exc:  # the name only: this can reach a register call's answer
        raise InputFileError(f"cannot read the signature {sig.name}: {exc.strerror}") from None
    except Exception as exc:  # noqa: BLE001 - json, pydantic, KeyError: any of them means "not a bundle"
        raise MalformedSignatureError(
            f"{sig.name} is not an OpenSSF model-signing bundle ({_why(exc)})"
        ) from None
    if bundle.media_type != sign_sigstore_pb._BUNDLE_MEDIA_TYPE:
        raise MalformedSignatureError(
            f"{sig.name} is not an OpenSSF model-signing bundle (media type {bundle.media_type!r})"
        )
    material = bundle.verification_material
    if getattr(material, "public_key", None) is None or bundle.dsse_envelope is None:
        raise UntrustedSignerError(
            f"{sig.name} is signed with a certificate or a Sigstore identity, not a key: it verifies "
            "only with 'model-archiver verify --certificate-chain' or '--sigstore-identity'"
        )
    return bundle


def _why(exc: BaseException) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON: {exc.msg} (byte {exc.pos})"
    if isinstance(exc, KeyError):
        return f"no {exc.args[0]!r} field" if exc.args else "a field is missing"
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0][:120]}" if first else type(exc).__name__


def _verify_bundle(
    archive: Path, sig: Path, bundle: Any, keys: tuple[TrustedKey, ...]
) -> tuple[TrustedKey, Any]:
    """The trusted key the bundle's signature verifies under, and the manifest it signs."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec
    from model_signing._signing import sign_ec_key, sign_sigstore_pb

    hint = bundle.verification_material.public_key.hint
    candidates = [k for k in keys if k.fingerprint == hint] if hint else list(keys)
    if not candidates:
        trusted = ", ".join(short(k.fingerprint) for k in keys)
        raise UntrustedSignerError(
            f"{archive.name} is signed by another key ({short(hint)}), none of the trusted keys ({trusted})"
        )
    for key in candidates:
        public_key = load_public_key(key.pem, key.label)
        envelope = bundle.dsse_envelope
        try:
            if len(envelope.signatures) != 1:
                raise MalformedSignatureError(
                    f"{sig.name} holds {len(envelope.signatures)} signatures, not one"
                )
            signed = envelope.signatures[0].sig
            digest = sign_ec_key.get_ec_key_hash(public_key)
            try:
                public_key.verify(signed, sign_sigstore_pb.pae(envelope.payload), ec.ECDSA(digest))
            except InvalidSignature:
                # model-signing before 1.0 signed a differently escaped encoding; 1.1.1 accepts both
                public_key.verify(signed, sign_sigstore_pb.pae_compat(envelope.payload), ec.ECDSA(digest))
        except InvalidSignature:
            continue
        return key, _manifest(sig, envelope)
    if hint:
        raise SignatureError(
            f"{sig.name} does not verify under the trusted key it names ({short(hint)}): the signature "
            "file was altered after signing"
        )
    raise UntrustedSignerError(f"{archive.name} is signed by a key that is none of the trusted keys")


def _manifest(sig: Path, envelope: Any) -> Any:
    """The signed payload as model-signing's manifest (its resources and how they were hashed)."""
    from model_signing._signing import signing as ms_signing

    try:
        if envelope.payload_type != ms_signing._IN_TOTO_JSON_PAYLOAD_TYPE:
            raise ValueError(f"payload type {envelope.payload_type!r}")
        payload = json.loads(envelope.payload)
        if payload.get("_type") != ms_signing._IN_TOTO_STATEMENT_TYPE:
            raise ValueError(f"statement type {payload.get('_type')!r}")
        return ms_signing.dsse_payload_to_manifest(payload)
    except Exception as exc:  # noqa: BLE001 - a signed payload that does not parse is malformed
        raise MalformedSignatureError(
            f"{sig.name} is signed but its payload is not a model-signing manifest ({_why(exc)})"
        ) from None


def _require_plain_sha256(archive: Path, sig: Path, expected: Any) -> None:
    """Refuse, before hashing, a signature whose digest is not one sha256 of the whole file (shards,
    another algorithm): its check would not give the sha256 a load is held to, and hashing the file
    again afterwards would pin whatever bytes are there by then."""
    args = expected.serialization_type
    if args.get("method") == "files" and args.get("hash_type") == "sha256":
        return
    how = "in shards" if args.get("method") == "shards" else f"with {args.get('hash_type')!r}"
    raise UnpinnableSignatureError(
        f"{sig.name} hashes {archive.name} {how}, not as one sha256 of the whole file: a server loads only "
        "an archive it can hold to the signed sha256 (sign it with 'model-archiver sign')"
    )


def _names_only(text: str, archive: Path) -> str:
    """``text`` with the archive's paths cut to its name: a refusal can reach a register call's answer."""
    for path in sorted(
        {str(hashed_path(archive)), str(archive), str(archive.absolute())}, key=len, reverse=True
    ):
        text = text.replace(path, archive.name)
    return text


def _actual_manifest(archive: Path, expected: Any) -> Any:
    """The archive hashed the way the signature says it was (file by file or in shards)."""
    from model_signing import hashing

    args = expected.serialization_type
    common = {
        "hashing_algorithm": args["hash_type"],
        "allow_symlinks": bool(args.get("allow_symlinks", False)),
    }
    if args["method"] == "shards":
        shard_size = int(args["shard_size"])  # a float once read back from the signed JSON payload
        config = hashing.Config().use_shard_serialization(shard_size=shard_size, **common)
    else:
        config = hashing.Config().use_file_serialization(**common)
    ignored = [p for p in args.get("ignore_paths", ()) if archive.is_dir()]
    return config.set_ignored_paths(paths=ignored, ignore_git_paths=False).hash(hashed_path(archive))


def _compare(archive: Path, sig: Path, expected: Any) -> str | None:
    """Raise unless the archive's files hash to the signed digests; a file archive's signed sha256."""
    want = {rd.identifier: rd.digest.digest_hex for rd in expected.resource_descriptors()}
    is_file = archive.is_file()
    signed_file = set(want) == {"."} or all(name.startswith(".:") for name in want)  # a file, or its shards
    if is_file != signed_file:
        what = "a single file" if signed_file else f"a folder of {len(want)} files"
        raise WrongArchiveSignatureError(
            f"{sig.name} is the signature of another archive ({expected.model_name!r}, {what}), not of "
            f"{archive.name}"
        )
    try:
        got = {
            rd.identifier: rd.digest.digest_hex
            for rd in _actual_manifest(archive, expected).resource_descriptors()
        }
    except (ValueError, KeyError) as exc:
        raise MalformedSignatureError(
            f"{sig.name} names a hashing model-signing cannot redo ({_names_only(_why(exc), archive)})"
        ) from None
    if got == want:
        # the digest of this one read, when it is the file's plain sha256; never a second read
        plain = is_file and expected.serialization_type.get("method") == "files" and "." in want
        return got["."] if plain and expected.serialization_type.get("hash_type") == "sha256" else None
    other_name = expected.model_name not in (archive.name, hashed_path(archive).name)  # a link's, its file's
    same = [name for name in want if got.get(name) == want[name]]
    if other_name and not same:
        raise WrongArchiveSignatureError(
            f"{sig.name} is the signature of another archive ({expected.model_name!r}), not of "
            f"{archive.name}: their contents differ"
        )
    if is_file:
        actual, signed = next(iter(got.values())), next(iter(want.values()))
        raise TamperedArchiveError(
            f"{archive.name} was changed after it was signed: the archive's sha256 is {short(actual)}, "
            f"the signature says {short(signed)}"
        )
    changed = sorted(n for n in want if n in got and got[n] != want[n])
    added = sorted(set(got) - set(want))
    missing = sorted(set(want) - set(got))
    if changed:
        detail = f"{changed[0]} was changed after it was signed"
    elif added:
        detail = f"{added[0]} is not covered by the signature (added after signing)"
    else:
        detail = f"{missing[0]} was signed but is missing"
    more = len(changed) + len(added) + len(missing) - 1
    raise TamperedArchiveError(f"{archive.name}: {detail}" + (f" (and {more} more)" if more > 0 else ""))
