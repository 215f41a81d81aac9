"""The server's signature check: with trusted keys, no archive loads unless a trusted key signed it.

The registry asks ``SignatureGate.check`` before it reads a byte of an archive (at start, on a
register call, on a ``--reload``), and puts the signed sha256 in the archive's ``WorkerSpec``
(``signed_sha256``, sent in each worker's start message), so a worker started later loads the bytes
that were checked or none.
Refusals are counted by reason for ``/metrics``. Without trusted keys the gate lets everything through
and ``model_signing`` is never imported.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from archiver.errors import SignatureError

if TYPE_CHECKING:
    from archiver.signing import SignatureCheck
    from archiver.signing_keys import TrustedKey


class SignatureGate:
    """Verifies archives against the server's trusted keys (none: every archive passes unchecked)."""

    def __init__(
        self,
        trusted_keys: tuple[TrustedKey, ...] = (),
        on_refusal: Callable[[str], None] | None = None,
    ) -> None:
        self.trusted_keys = tuple(trusted_keys)
        self._on_refusal = on_refusal

    @property
    def active(self) -> bool:
        return bool(self.trusted_keys)

    async def check(self, source: Path) -> SignatureCheck | None:
        """The verified signature of ``source`` (None without trusted keys); SignatureError if refused.

        Runs off the event loop: it reads the whole archive once.
        """
        if not self.trusted_keys:
            return None
        from archiver.signing import verify

        try:
            return await asyncio.get_running_loop().run_in_executor(
                None, lambda: verify(source, self.trusted_keys, allow_folder=False)
            )
        except SignatureError as exc:
            if self._on_refusal is not None:
                self._on_refusal(exc.reason)
            raise
