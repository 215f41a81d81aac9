"""Which requests a server without a token answers: those for its own host names from its own origin.

Why: without a token, whatever reaches the port drives the server, and a web page the user visits
reaches a loopback port too. A ``fetch(..., {method: "POST", mode: "no-cors"})`` or an HTML form is sent
without a CORS preflight, so a foreign page could register models or run predictions; with DNS
rebinding (a name of the attacker's that first resolves to its own address, then to 127.0.0.1) it can
even read the answers, as same-origin. Jupyter protects its loopback server the same way:

- the ``Host`` header must name this server: a loopback name (``localhost``, ``127.0.0.1``, ``[::1]``),
  the address it is bound to (any IP address when bound to ``0.0.0.0`` or ``::``: a rebinding always
  carries a DNS name), or one of ``--allowed-hosts``; the port is not compared (port forwards);
- an ``Origin`` header, on any method, must be the server's own or one of ``--allowed-origins``; ``null``
  (sandboxed frames, ``file:`` pages) is foreign. The server's own is the origin the browser sent the
  request to: ``http://`` and exactly the host its ``Host`` names (any name the server answers to is not
  enough: on a ``0.0.0.0`` bind every address is one, and a page at ``http://<another machine>:<this
  port>`` is another site; so is ``127.0.0.2`` on the same port, which can be another program's),
  with the port the request arrived on or the one ``Host`` names (80 when it names none). More than
  one ``Origin`` header is refused (which one a browser sent cannot be told);
- a request that changes or computes anything (every method but GET and HEAD) with no ``Origin`` but
  ``Sec-Fetch-Site: cross-site`` or ``same-site`` is refused too.

GET and HEAD without an ``Origin`` pass: a link or an image from another site sends none, cannot read the
answer, and a person following a link to the page must get it. ``*`` in either list turns that check
off. A bearer token is never added by the browser on its own, so with a token these rules are off and
the token decides (``app.py``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from archiver.errors import CrossSiteRequestError, UsageError

ANY = "*"
LOOPBACK_NAMES = frozenset({"localhost"})
# The methods a browser may send from another site without an Origin and that only read.
READ_METHODS = frozenset({"GET", "HEAD"})
_WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})
_HOST = re.compile(r"\[(?P<v6>[0-9A-Fa-f:.]{2,45})\]|(?P<name>[A-Za-z0-9._-]{1,253})")
_PORT = re.compile(r"[0-9]{1,5}")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CACHE_SIZE = 1024  # header values remembered per kind


@dataclass(frozen=True)
class Origin:
    """A web origin, normalized: lower-case scheme and host, the port always written out."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def normal_host(text: str) -> str | None:
    """``text`` (a host, ``[v6]``, either with ``:port``) as one comparable name, or None if it is none.

    Addresses are written as ``ipaddress`` writes them, names in lower case without a final dot.
    """
    host, _ = split_host_port(text) or (None, None)
    return host


def split_host_port(text: str) -> tuple[str, int | None] | None:
    """A ``Host`` header's (normalized host, port or None); None when it is not a host at all."""
    head, sep, port_text = text.strip().rpartition(":")
    if not sep or "]" in port_text or (head and not head.endswith("]") and ":" in head):
        head, port_text = text.strip(), ""  # no port: a name, an address, or a bare IPv6 address
    port = None
    if port_text:
        if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
            return None
        port = int(port_text)
    match = _HOST.fullmatch(head)
    if match is None:
        try:  # an unbracketed IPv6 address, as --host and --allowed-hosts may be written
            return ipaddress.IPv6Address(head.strip()).compressed, None
        except ValueError:
            return None
    if match["v6"] is not None:
        try:
            return ipaddress.IPv6Address(match["v6"]).compressed, port
        except ValueError:
            return None
    name = match["name"].lower().rstrip(".")
    try:
        return ipaddress.IPv4Address(name).compressed, port
    except ValueError:
        return (name, port) if name else None


def parse_origin(text: str) -> Origin | None:
    """An ``Origin`` header or ``--allowed-origins`` entry (``scheme://host[:port]``), or None."""
    scheme, sep, rest = text.strip().partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        return None
    split = split_host_port(rest[:-1] if rest.endswith("/") else rest)
    if split is None:
        return None
    host, port = split
    return Origin(scheme, host, port if port is not None else _DEFAULT_PORTS[scheme])


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class SiteRules:
    """The host names and origins one server answers when it has no token."""

    bound_host: str = "127.0.0.1"
    allowed_hosts: frozenset[str] = frozenset()
    allowed_origins: frozenset[str] = frozenset()
    # Verdicts by header value: clients send the same few Host and Origin values again and again, and
    # reading one (ipaddress) costs about ten times the look-up. Not part of the rules' identity.
    _hosts: dict[str, tuple[bool, int | None]] = field(default_factory=dict, compare=False, repr=False)
    _origins: dict[tuple[str, int | None, int | None], bool] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def build(
        cls, bound_host: str, allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = ()
    ) -> SiteRules:
        """The rules for a server bound to ``bound_host``; a malformed entry is a ``UsageError``."""
        hosts: set[str] = set()
        for entry in _entries(allowed_hosts):
            host = ANY if entry == ANY else normal_host(entry)
            if host is None:
                raise UsageError(f"--allowed-hosts: {entry!r} is not a host name or address (or '*')")
            hosts.add(host)
        origins: set[str] = set()
        for entry in _entries(allowed_origins):
            origin = None if entry == ANY else parse_origin(entry)
            if entry != ANY and origin is None:
                raise UsageError(
                    f"--allowed-origins: {entry!r} is not an origin such as 'http://localhost:3000' (or '*')"
                )
            origins.add(ANY if origin is None else str(origin))
        bound = bound_host.strip()
        bound = bound if bound in _WILDCARD_BINDS else (normal_host(bound) or bound)
        return cls(bound, frozenset(hosts), frozenset(origins))

    def host_allowed(self, host: str) -> bool:
        """Whether a normalized host name is one this server answers to."""
        if ANY in self.allowed_hosts or host in self.allowed_hosts or _is_loopback(host):
            return True
        if self.bound_host in _WILDCARD_BINDS:
            return _is_ip(host)
        return host == self.bound_host

    def check(self, method: str, headers: Mapping[str, str], arrival_port: int | None) -> None:
        """Raise ``CrossSiteRequestError`` unless the request is for this server from its own origin."""
        host_header = headers.get("Host")
        host_port: int | None = None
        if host_header is not None:  # every browser sends one; a bare HTTP/1.0 client may not
            allowed, host_port = self._host_verdict(host_header)
            if not allowed:
                raise CrossSiteRequestError(
                    f"Host {host_header[:100]!r} is not a name of this server: without a token it answers "
                    "only its own address and loopback names (add names with --allowed-hosts)"
                )
        origin_header = headers.get("Origin")
        if origin_header is not None:
            if ANY in self.allowed_origins:
                return
            count = len(_all(headers, "Origin"))
            if count > 1:  # the first one would be judged, and who added the others cannot be told
                raise CrossSiteRequestError(
                    f"a request with {count} Origin headers is refused: a browser sends one"
                )
            if not self._origin_verdict(origin_header, arrival_port, host_header, host_port):
                raise CrossSiteRequestError(
                    f"requests from the web origin {origin_header[:100]!r} are refused: without a token "
                    "this server answers only its own pages (add origins with --allowed-origins)"
                )
            return
        fetch_site = headers.get("Sec-Fetch-Site", "").lower()
        if method not in READ_METHODS and fetch_site in ("cross-site", "same-site"):
            raise CrossSiteRequestError(
                f"a {fetch_site} {method} request is refused: without a token this server answers only "
                "its own pages"
            )

    def _host_verdict(self, host_header: str) -> tuple[bool, int | None]:
        """(whether the Host header names this server, the port it names)."""
        verdict = self._hosts.get(host_header)
        if verdict is None:
            split = split_host_port(host_header)
            verdict = (split is not None and self.host_allowed(split[0]), split[1] if split else None)
            _remember(self._hosts, host_header, verdict)
        return verdict

    def _origin_verdict(
        self, origin_header: str, arrival_port: int | None, host_header: str | None, host_port: int | None
    ) -> bool:
        """Whether the Origin header is this server's own or an allowed one."""
        key = (origin_header, arrival_port, host_header)
        verdict = self._origins.get(key)
        if verdict is None:
            origin = parse_origin(origin_header)
            verdict = origin is not None and (
                str(origin) in self.allowed_origins or _own(origin, arrival_port, host_header, host_port)
            )
            _remember(self._origins, key, verdict)
        return verdict


def _own(origin: Origin, arrival_port: int | None, host_header: str | None, host_port: int | None) -> bool:
    """Whether ``origin`` is the one the browser sent this request to: http, the very host ``Host``
    names (already checked to be one of ours), and the port the request arrived on or ``Host`` names."""
    if origin.scheme != "http" or host_header is None:  # no Host: no browser, and nothing to compare
        return False
    if origin.host != normal_host(host_header):
        return False
    # A Host without a port names http's default one; a port forward makes it differ from the arrival's.
    return origin.port in (arrival_port, host_port if host_port is not None else _DEFAULT_PORTS["http"])


def _all(headers: Mapping[str, str], name: str) -> Sequence[str]:
    """Every value of a header: aiohttp's headers keep repeats (``getall``), a plain dict has one."""
    try:
        return headers.getall(name, ())  # type: ignore[attr-defined]
    except AttributeError:
        value = headers.get(name)
        return () if value is None else (value,)


def _remember(cache: dict[Any, Any], key: Any, verdict: Any) -> None:
    """Keep a verdict; a client cycling through new header values only empties the cache now and then."""
    if len(cache) >= _CACHE_SIZE:
        cache.clear()
    cache[key] = verdict


def _entries(values: Iterable[str]) -> list[str]:
    """Flag values as given: repeated, or comma-separated in one value."""
    return [part.strip() for value in values for part in str(value).split(",") if part.strip()]
