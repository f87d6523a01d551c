"""The SSRF guard of webhook targets: which addresses a callback may reach, and where to connect.

A callback URL is a request, by a tenant, that Relay's own network position be used to reach
an address. Only globally routable addresses are allowed: the guard resolves the host and
refuses the URL when any address it resolves to is not one, in any of its spellings (an IPv4
address inside an IPv6 one: mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`, 6to4, Teredo,
IPv4-compatible `::a.b.c.d`). Every delivery checks again and connects to the address it
checked, so a name that later resolves elsewhere (DNS rebinding) reaches nothing it should not.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import NamedTuple
from urllib.parse import SplitResult, urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

RESOLVE_TIMEOUT_S = 5.0
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_SIXTOFOUR = ipaddress.IPv6Network("2002::/16")
_V4_NOT_GLOBAL = (
    # What `is_global` misses on some Python versions, named here so no version lets them by.
    ipaddress.IPv4Network("0.0.0.0/8"),
    ipaddress.IPv4Network("100.64.0.0/10"),  # CGNAT (shared address space)
    ipaddress.IPv4Network("192.0.0.0/24"),
    ipaddress.IPv4Network("198.18.0.0/15"),
    ipaddress.IPv4Network("224.0.0.0/4"),  # multicast
    ipaddress.IPv4Network("240.0.0.0/4"),  # reserved, and broadcast
)


class Refused(ValueError):
    """The URL may not be called; the message says why, for the user."""


class Target(NamedTuple):
    """A checked callback URL: where to connect, and what to say the host is."""

    url: SplitResult
    host: str
    """The URL's host as written (for the Host header, and SNI and TLS verification)."""
    port: int
    addresses: tuple[Address, ...]
    """What the host resolved to, every one of them checked."""


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries, in any of the forms that route to it."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if any(address in net for net in _NAT64) or address in _IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
    if address in _SIXTOFOUR:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # the client's address
    return None


def is_forbidden(address: Address) -> bool:
    """True when `address` is not globally routable, in itself or in the IPv4 address it
    embeds: loopback, private, link-local, CGNAT, unspecified, multicast, reserved ..."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            return True  # a zone index names a local interface
        inner = embedded_ipv4(address)
        if inner is not None:
            # ::/96 holds :: and ::1 too: both refused as their IPv4 forms (0.0.0.0, 0.0.0.1).
            return is_forbidden(inner)
        return (not address.is_global or address.is_multicast or address.is_reserved
                or address.is_site_local or address.is_link_local)
    return (not address.is_global or address.is_multicast or address.is_reserved
            or address.is_loopback or address.is_link_local or address.is_unspecified
            or any(address in net for net in _V4_NOT_GLOBAL))


def literal_address(host: str) -> Address | None:
    """The address a host written as an IP literal means, in every form resolvers take:
    `127.0.0.1`, `::1`, and the legacy IPv4 forms `inet_aton` accepts (`2130706433`,
    `0177.0.0.1`, `0x7f.1`). None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefxABCDEFX." for c in host) and host[0].isdigit():
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def parse(url: str, *, allow_http: bool) -> tuple[SplitResult, str, int]:
    """The URL, its host and port. Raises Refused for what cannot be a callback target."""
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError as exc:
        raise Refused(f"not a valid URL: {exc}") from None
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes:
        raise Refused("the URL must be https" + (" or http" if allow_http else "")
                      + (" (http is allowed only with RELAY_WEBHOOK_ALLOW_HTTP=1)"
                         if parts.scheme == "http" else ""))
    if not host:
        raise Refused("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise Refused("the URL may not carry credentials")
    return parts, host, port or (443 if parts.scheme == "https" else 80)


async def check(url: str, *, allow_http: bool, allow_private: bool) -> Target:
    """Resolve `url`'s host and check every address. Raises Refused (the URL is not allowed,
    or its host does not resolve)."""
    parts, host, port = parse(url, allow_http=allow_http)
    literal = literal_address(host)
    if literal is not None and not allow_private and is_forbidden(literal):
        raise Refused(f"{host} is not a globally routable address")
    addresses = (literal,) if literal is not None else await resolve(host, port)
    if not allow_private:
        for address in addresses:
            if is_forbidden(address):
                raise Refused(f"{host} resolves to {address}, which is not a globally routable "
                              "address")
    return Target(parts, host, port, addresses)


async def resolve(host: str, port: int) -> tuple[Address, ...]:
    """Every address `host` resolves to. Raises Refused when it resolves to none."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S)
    except (OSError, TimeoutError, UnicodeError) as exc:
        raise Refused(f"{host} does not resolve: {exc}") from None
    found: list[Address] = []
    for _, _, _, _, sockaddr in infos:
        text = str(sockaddr[0]).partition("%")[0]  # a zone index: refused by is_forbidden
        address = ipaddress.ip_address(text)
        if isinstance(address, ipaddress.IPv6Address) and "%" in str(sockaddr[0]):
            address = ipaddress.IPv6Address(str(sockaddr[0]))
        if address not in found:
            found.append(address)
    if not found:
        raise Refused(f"{host} does not resolve")
    return tuple(found)
