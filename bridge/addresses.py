"""Addresses as a config writes them: a listener's ``HOST:PORT``, a host name
the admin page answers to, the networks trusted to read /metrics.

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
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
