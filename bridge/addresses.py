"""Addresses as a config writes them: a listener's ``HOST:PORT``, a host name
the admin page answers to, the networks trusted to read /metrics; and a
client's address as the per-client limits count it (``client_key``).

Pure parsing (the standard library's ``ipaddress`` and a regular expression),
so the loader (bridge/config_loader.py) checks them and the daemon, the
listeners and the admin page read them the same way. Nothing here resolves a
name or opens a socket.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*")  # also an IPv4 address


def parse_host_name(value: str) -> str | None:
    """A host name or IP address as ``[admin] Hosts`` lists it, normalized
    (lower case, no trailing dot, an IPv6 address without brackets); None
    when it is not one."""
    name = value.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if ":" in name:
        try:
            return str(ipaddress.IPv6Address(name))
        except ValueError:
            return None
    return name if len(name) <= 253 and _HOST_NAME.fullmatch(name) else None


def is_loopback(host: str) -> bool:
    """Whether a listener's host is reachable from this machine only:
    ``localhost`` or a loopback address (a zone id names no other host; an
    IPv4-mapped IPv6 address is its IPv4 one). Another host name may
    resolve to anything: not loopback."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def client_key(remote: str | None) -> str:
    """Whom a per-client limit counts (the management page's lockout, an api
    account's open streams): an IPv4 address, or an IPv6 address's /64 (one
    host commonly holds a whole /64: counting each address would give it
    2**64 tries); an IPv4-mapped IPv6 address is its IPv4 one."""
    try:
        address = ipaddress.ip_address((remote or "").split("%", 1)[0])  # a zone id names no other host
    except ValueError:
        return remote or "unknown"  # a Unix socket, say: one client
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def parse_hostport(value: str) -> tuple[str, int] | None:
    """'127.0.0.1:4280', '[::1]:80', ':4280' -> (host, port)."""
    m = re.fullmatch(r"\[?([^\[\]]*?)\]?:(\d{1,5})", value.strip())
    if not m or not 0 <= int(m.group(2)) <= 65535:
        return None
    return (m.group(1) or "0.0.0.0", int(m.group(2)))


def parse_networks(values: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``[http] MetricsFrom``: addresses and networks ("10.0.0.5", "10.0.0.0/8",
    "::1"); ``ValueError`` names the first that is neither."""
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f'"{value}" is not an IP address or network (e.g. "10.0.0.0/8", "::1")') from None
    return tuple(out)
