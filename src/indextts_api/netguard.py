"""No SSRF through client-given URLs: ``hook_url`` and prompt URLs reach public addresses only.

Unless ALLOW_PRIVATE_URLS is on, a URL may not lead to loopback, private, link-local (cloud
metadata), CGNAT, multicast, unspecified or reserved addresses, IPv4 or IPv6 (IPv4-mapped,
6to4, Teredo and NAT64 forms included). Two layers:

- at submission, the API refuses what is internal without looking anything up: IP literals in any
  spelling the C library accepts (``2130706433``, ``0x7f.1``, ``017700000001``) and ``localhost``;
- at connection time, the HTTP client resolves the host itself, refuses the connection if any
  address is internal, and connects to the address it checked (no second lookup, so no DNS
  rebinding). This runs for every connection, so for every redirect too.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import httpcore

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# NAT64 well-known prefix: the last 32 bits are an IPv4 address.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


class ForbiddenAddress(httpcore.ConnectError):
    """The URL leads to an internal address. Subclasses ConnectError so httpx reports it as one."""


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries (mapped, 6to4, Teredo, NAT64)."""
    carried: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        carried.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        carried.append(address.sixtofour)
    if address.teredo is not None:
        carried.extend(address.teredo)
    if address in _NAT64:
        carried.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return carried


def is_public(address: IPAddress) -> bool:
    """True only for globally routable unicast addresses."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return False
        carried = embedded_ipv4(address)
        if carried:
            return all(is_public(v4) for v4 in carried)
    return bool(
        address.is_global
        and not address.is_multicast
        and not address.is_reserved
        and not address.is_unspecified
        and not address.is_loopback
        and not address.is_link_local
    )


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a host string denotes by itself, in any spelling, or None for a name."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host.split("%", 1)[0] if "%" in host else host)
    except ValueError:
        pass
    # inet_aton accepts what URL libraries and the resolver accept: decimal, octal, hex, short forms.
    if host and all(c in "0123456789abcdefABCDEFxX." for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def is_local_name(host: str) -> bool:
    host = host.rstrip(".").lower()
    return host in _LOCAL_NAMES or host.endswith(".localhost")


def known_internal_reason(url: str) -> str | None:
    """Why ``url`` is internal without a DNS lookup (IP literal or local name), else None."""
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    if is_local_name(host):
        return f"host {host!r} is local"
    literal = parse_ip_literal(host)
    if literal is not None and not is_public(literal):
        return f"address {literal} is not public"
    return None


def resolve_public(host: str, port: int) -> str:
    """The first address of ``host``, after checking that every address it resolves to is public."""
    literal = parse_ip_literal(host)
    if literal is not None:
        if not is_public(literal):
            raise ForbiddenAddress(f"{host} is not a public address")
        return str(literal)
    if is_local_name(host):
        raise ForbiddenAddress(f"{host} is local")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
    addresses = _unique(ipaddress.ip_address(info[4][0]) for info in infos)
    internal = [a for a in addresses if not is_public(a)]
    if internal or not addresses:
        raise ForbiddenAddress(f"{host} resolves to a non-public address ({internal[0] if internal else 'none'})")
    return str(addresses[0])


def _unique(addresses: Iterable[IPAddress]) -> list[IPAddress]:
    return list(dict.fromkeys(addresses))


class GuardedBackend(httpcore.SyncBackend):
    """httpcore's network backend, connecting only to checked public addresses."""

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        # TLS still verifies the certificate against the URL's host name: httpcore passes the
        # origin's host to start_tls, not this address.
        return super().connect_tcp(resolve_public(host, port), port, timeout, local_address, socket_options)
