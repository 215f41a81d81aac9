"""``serve``'s gRPC ports: ``--grpc-port`` and ``--grpc-management-port`` (or --config's keys), each a
number (0: a free port) or ``off``; TorchServe's 7070 and 7071 when not given."""

from __future__ import annotations

from typing import Any

from archiver.errors import UsageError

DEFAULTS = {"grpc_port": 7070, "grpc_management_port": 7071}


def grpc_port(key: str, flags: dict[str, Any], file_cfg: dict[str, Any], port: int) -> int | None:
    """A gRPC port as given (None for "off"), else its default; with ``--port 0`` and no gRPC port
    given, a free one too, so servers started on free ports never meet on 7070."""
    from archiver.settings_bounds import parse

    flag, configured = flags.get(key), file_cfg.get(key)
    given = flag if flag is not None else configured
    if given is None:
        return 0 if port == 0 else DEFAULTS[key]
    name = "--" + key.replace("_", "-") if flag is not None else key
    if given is False or str(given).strip().lower() == "off":  # YAML reads a bare `off` as false
        return None
    if given is True:
        raise UsageError(f"{name} must be an integer from 0 to 65535 or off, got true")
    try:
        return parse("port", str(given), name)
    except UsageError as exc:
        raise UsageError(exc.message.replace(" from 0 to 65535,", " from 0 to 65535 or off,")) from None


def grpc_ports(flags: dict[str, Any], file_cfg: dict[str, Any], port: int) -> dict[str, int | None]:
    """ServerSettings' ``grpc_port`` and ``grpc_management_port``."""
    return {key: grpc_port(key, flags, file_cfg, port) for key in DEFAULTS}
