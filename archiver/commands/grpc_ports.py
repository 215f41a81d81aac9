"""``serve``'s gRPC ports: ``--grpc-port`` and ``--grpc-management-port`` (or --config's keys), each a
number (0: a free port) or ``off``; TorchServe's 7070 and 7071 when not given.

A port given and taken stops the server at start, as an HTTP port does. A default port that is taken
(another server on this machine, TorchServe's own among them, holds 7070) turns that gRPC server off
with a line on stderr instead: the server was not asked for gRPC there, and should not fail to start
because something else took a port it never named.
"""

from __future__ import annotations

import dataclasses
import socket
from typing import Any

import click

from archiver.errors import UsageError

DEFAULTS = {"grpc_port": 7070, "grpc_management_port": 7071}
_NAMES = {"grpc_port": "--grpc-port", "grpc_management_port": "--grpc-management-port"}


def grpc_port(key: str, flags: dict[str, Any], file_cfg: dict[str, Any], port: int) -> int | None:
    """A gRPC port as given (None for "off"), else its default; with ``--port 0`` and no gRPC port
    given, a free one too, so servers started on free ports never meet on 7070."""
    from archiver.settings_bounds import parse

    flag, configured = flags.get(key), file_cfg.get(key)
    given = flag if flag is not None else configured
    if given is None:
        return 0 if port == 0 else DEFAULTS[key]
    name = _NAMES[key] if flag is not None else key
    if given is False or str(given).strip().lower() == "off":  # YAML reads a bare `off` as false
        return None
    if given is True:
        raise UsageError(f"{name} must be an integer from 0 to 65535 or off, got true")
    try:
        return parse("port", str(given), name)
    except UsageError as exc:
        raise UsageError(exc.message.replace(" from 0 to 65535,", " from 0 to 65535 or off,")) from None


def _taken(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def grpc_ports(flags: dict[str, Any], file_cfg: dict[str, Any], port: int) -> dict[str, Any]:
    """ServerSettings' ``grpc_port`` and ``grpc_management_port``, as given or defaulted, and which
    were defaulted (``grpc_defaulted``)."""
    ports: dict[str, Any] = {key: grpc_port(key, flags, file_cfg, port) for key in DEFAULTS}
    ports["grpc_defaulted"] = tuple(k for k in DEFAULTS if flags.get(k) is None and file_cfg.get(k) is None)
    return ports


def without_taken_defaults(settings: Any) -> Any:
    """``settings`` with each defaulted gRPC port that is taken turned off (a line on stderr for each).

    Called once the server is sure to start (after the exposure check), so a refusal stays one line."""
    off = {}
    for key in DEFAULTS:
        value = getattr(settings, key)
        if key in settings.grpc_defaulted and value and _taken(settings.host, value):
            off[key] = None
            click.echo(
                f"model-archiver serve: gRPC port {value} is taken (another server?): that gRPC server is "
                f"off; choose one with {_NAMES[key]} PORT (0: a free one)",
                err=True,
            )
    return dataclasses.replace(settings, **off) if off else settings
