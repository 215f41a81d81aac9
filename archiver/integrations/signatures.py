"""Signature checks on the engine hosts: a Ray replica or the KServe runtime verifies its archive against
the trusted keys before loading it, as the bundled server does (``serving/signature_gate.py``).

Keys travel as text: a Ray config's ``args.trusted_keys`` holds each key's PEM (``deploy ray
--trusted-key`` embeds them, so replicas on other nodes need no key files), the KServe runtime reads
``--trusted_key`` files (``deploy kserve`` mounts them from a ConfigMap). A path works in both.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from archiver.signing import SignatureCheck
    from archiver.signing_keys import TrustedKey


def trusted_keys(items: Iterable[str] | str | None) -> tuple[TrustedKey, ...]:
    """The keys ``items`` name (PEM texts or paths; one string is one key); () for none."""
    if not items:
        return ()
    from archiver.signing_keys import read_trusted_keys

    return read_trusted_keys([items] if isinstance(items, str) else list(items))


def check_archive(source: Path, keys: tuple[TrustedKey, ...]) -> SignatureCheck | None:
    """The verified signature of ``source`` (None without keys); a SignatureError, saying what failed,
    before a byte of the archive is read otherwise. Folder archives are refused.

    Pass its ``sha256`` to ``load_model(signed_sha256=…)``: the load then refuses an archive swapped
    after this check, instead of running it."""
    if not keys:
        return None
    from archiver.signing import verify

    return verify(source, keys, allow_folder=False)


def signed_sha256(check: SignatureCheck | None) -> str | None:
    """The sha256 a load is held to: the checked one, None when nothing was checked (no keys)."""
    return check.sha256 if check is not None else None


def pem_texts(keys: tuple[TrustedKey, ...]) -> list[str]:
    """The keys as PEM text, to embed in a config the hosts read back with ``trusted_keys``."""
    return [key.pem.decode("ascii").strip() + "\n" for key in keys]
