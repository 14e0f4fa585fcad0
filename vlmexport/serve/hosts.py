"""Which Host names the server answers to, and which POSTs it refuses as cross-origin.

A page on attacker.example can make a browser send requests to a localhost server, and
rebind attacker.example's DNS to 127.0.0.1 so that they even look same-origin to the browser
(DNS rebinding); only the Host header tells such a request apart, so it is checked against
an allow-list. A cross-origin POST is refused by its Origin (or Sec-Fetch-Site) header.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARDS = ("0.0.0.0", "::", "")
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class HostPolicy:
    """Names a request's Host may carry (ports aside)."""

    names: frozenset[str]
    ip_literals: bool = False  # any IP address: a rebinding page cannot use one (its origin would change)
    any_host: bool = False

    def allows(self, host: str) -> bool:
        name = host_name(host)
        if name is None:
            return False
        if self.any_host or name in self.names or name.endswith(".localhost"):  # *.localhost is loopback in every browser
            return True
        return self.ip_literals and _is_ip(name)

    def refusal(self, headers: Mapping[str, str], method: str) -> tuple[str, str] | None:
        """(problem, fix) if the request must be refused (→ 403), else None."""
        host = headers.get("host", "")
        if not self.allows(host):
            shown = host.encode("unicode_escape").decode("ascii")[:80] or "(none)"
            return f"Host {shown} is not one this server answers to", "use http://localhost:PORT, or start the server with --allowed-host NAME"
        if method in UNSAFE_METHODS:
            origin = headers.get("origin")
            cross = headers.get("sec-fetch-site") == "cross-site" or (origin is not None and _origin_host(origin) != host.lower())
            if cross:
                return "cross-origin requests are refused", "POST from the page this server serves, or without an Origin header (curl)"
        return None


def host_policy(bind_host: str, extra: Iterable[str] = ()) -> HostPolicy:
    """Localhost names, plus the address listened on; on every interface (0.0.0.0 or ::) also any
    IP address and this machine's names. `extra` adds names; `*` allows any Host."""
    extra = [name.lower() for name in extra]
    names = set(LOCAL_NAMES) | set(extra) | ({bind_host.lower().strip("[]")} - set(WILDCARDS))
    wildcard = bind_host in WILDCARDS
    if wildcard:
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    return HostPolicy(frozenset(names), ip_literals=wildcard, any_host="*" in extra)


def host_name(host: str) -> str | None:
    """The name of a Host header without its port ("[::1]:8000" → "::1"), or None if malformed."""
    host = host.strip().lower()
    if host.startswith("["):
        name, bracket, rest = host[1:].partition("]")
        return name if bracket and (not rest or (rest.startswith(":") and rest[1:].isdigit())) else None
    name, colon, port = host.partition(":")
    if colon and not port.isdigit():
        return None
    return name or None


def _origin_host(origin: str) -> str | None:
    scheme, sep, rest = origin.strip().lower().partition("://")
    return rest.rstrip("/") if sep and scheme in ("http", "https") else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
