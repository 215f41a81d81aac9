"""The click options several commands share, declared once so that a flag's name, parameter and type
stay the same in every command that takes it; each command still words its own help where its use differs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

Decorator = Callable[[Any], Any]

# a key, certificate or signing key given on the command line: a file that is there
EXISTING_FILE = click.Path(exists=True, dir_okay=False)


def archive_argument(*, exists: bool = False) -> Decorator:
    """ARCHIVE, one archive's path; ``exists`` lets click refuse a missing one (inspect and verify
    report a missing archive themselves)."""
    return click.argument("archive_path", metavar="ARCHIVE", type=click.Path(exists=exists))


def force_option(help_text: str) -> Decorator:
    """``-f/--force``: overwrite what the command would otherwise refuse to replace."""
    return click.option("-f", "--force", is_flag=True, help=help_text)


def key_file_option(flag: str, help_text: str) -> Decorator:
    """One key or certificate file (``--private-key``, ``--sign-key``, ``--certificate``)."""
    return click.option(flag, type=EXISTING_FILE, help=help_text)


def public_key_option(help_text: str) -> Decorator:
    """``--public-key`` (repeatable): EC public keys a signature may have been made with."""
    return click.option("--public-key", "public_keys", multiple=True, type=EXISTING_FILE, help=help_text)


def trusted_key_option(help_text: str) -> Decorator:
    """``--trusted-key`` (repeatable): only archives one of these EC public keys signed are loaded."""
    return click.option("--trusted-key", "trusted_keys", multiple=True, type=EXISTING_FILE, help=help_text)


def signature_option(help_text: str) -> Decorator:
    """``--signature``: the signature file, ARCHIVE.sig beside the archive when not given."""
    return click.option("--signature", "signature_path", type=click.Path(dir_okay=False), help=help_text)


def certificate_chain_option(help_text: str) -> Decorator:
    """``--certificate-chain`` (repeatable): certificates of a certificate-mode signature."""
    return click.option("--certificate-chain", multiple=True, type=EXISTING_FILE, help=help_text)


def cache_dir_option() -> Decorator:
    """``--cache-dir``: where archives are unpacked (``~/.cache/model-archiver`` by default)."""
    return click.option(
        "--cache-dir", type=click.Path(file_okay=False), help="Unpack cache.  [~/.cache/model-archiver]"
    )
