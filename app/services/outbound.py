"""Requests the server sends to addresses a user named (job-end notifications): public
addresses only, so a spec can't make the server reach its own network (loopback, the LAN, a
cloud's metadata service at 169.254.169.254) or scan its ports.

The check runs twice: when the job is submitted (a clear 422) and on every delivery, against
the very address the connection is made to, so a name that resolved to a public address at
submission and to a private one later (DNS rebinding) is still refused. Redirects are never
followed. `FINETUNE_NOTIFY_ALLOW_PRIVATE` lifts the rule for on-premises receivers.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import cast
from urllib.parse import urlsplit

import httpcore

from app.settings import get_settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class OutboundRefused(httpcore.ConnectError):
    """The host resolves to an address the server may not send to (or to none)."""


# IPv6 prefixes whose last 32 bits are an IPv4 address the packet reaches: IPv4-compatible
# (::a.b.c.d, `::` and `::1` among them) and NAT64's well-known prefix (RFC 6052).
LAST_32_BITS_IPV4 = (ipaddress.IPv6Network("::/96"), ipaddress.IPv6Network("64:ff9b::/96"))
# NAT64 for a local network (RFC 8215): never public, and where the IPv4 address sits depends on
# the prefix length the operator picked.
LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (IPv4-mapped, IPv4-compatible, NAT64, 6to4,
    or a Teredo client's), or None."""
    if any(address in prefix for prefix in LAST_32_BITS_IPV4):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]


def is_public(address: Address) -> bool:
    """A globally routable unicast address; an IPv4 address embedded in IPv6 is judged as itself."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in LOCAL_NAT64:
            return False
        embedded = embedded_ipv4(address)
        if embedded is not None:
            return is_public(embedded)
    return address.is_global and not address.is_multicast


def allowed_addresses(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, if the server may send to all of them; else
    OutboundRefused. One private address among public ones refuses the host."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise OutboundRefused(f"{host} does not resolve") from exc
    # an AF_INET/AF_INET6 socket address starts with the address text
    addresses = list(dict.fromkeys(cast(str, info[4][0]) for info in infos))
    if not get_settings().notify_allow_private:
        for text in addresses:
            if not is_public(ipaddress.ip_address(text.split("%")[0])):
                raise OutboundRefused(
                    f"{host} resolves to a loopback, private, link-local or reserved address; "
                    "only public addresses are allowed (FINETUNE_NOTIFY_ALLOW_PRIVATE for on-premises hooks)"
                )
    return addresses


def url_problem(url: str) -> str | None:
    """Why the server would refuse to send to `url`, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http or https URL"
    try:
        allowed_addresses(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except OutboundRefused as exc:
        return str(exc)
    return None


class PublicOnlyBackend(httpcore.SyncBackend):
    """httpcore's network backend, connecting only to addresses `allowed_addresses` passed, and
    to exactly those (TLS still checks the certificate against the URL's host name)."""

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        last_error: Exception | None = None
        for address in allowed_addresses(host, port):
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                last_error = exc
        raise last_error or OutboundRefused(f"{host} has no address")


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """POST `body` to `url` from the server, refusing private targets; the response's status.
    Raises httpcore errors (OutboundRefused among them) when no response came."""
    timeouts = {"connect": timeout_s, "read": timeout_s, "write": timeout_s, "pool": timeout_s}
    # httpcore, not httpx: it never follows redirects or reads proxy settings from the environment.
    with httpcore.ConnectionPool(network_backend=PublicOnlyBackend()) as pool:
        response = pool.request(
            "POST", url, headers=list(headers.items()), content=body, extensions={"timeout": timeouts}
        )
        return response.status
