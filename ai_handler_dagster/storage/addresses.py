"""Network guards for output downloads: host allow-list and address classification.

A prediction's output URL comes from a third party. Before this project fetches it, the host must
be on an allow-list and every address the host resolves to must be a public one, so a hostile or
compromised URL cannot make the worker read cloud metadata (169.254.169.254), an internal service,
or the worker itself. The download connects to the exact address checked here (see
``download.py``), so a DNS answer that changes between check and connect cannot bypass the check.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Resolves ``(host, port)`` to IP address strings. Injectable so tests can simulate any DNS answer.
Resolver = Callable[[str, int], Sequence[str]]


def system_resolver(host: str, port: int) -> list[str]:
    """Resolve ``host`` with the operating system's resolver; addresses in preference order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    seen: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in seen:
            seen.append(address)
    return seen


def parse_ip(host: str) -> IPAddress | None:
    """The IP address ``host`` spells (brackets allowed for IPv6), or None for a DNS name."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def address_problem(address: IPAddress, *, allow_loopback: bool) -> str | None:
    """Why ``address`` must not be contacted, or None when it is a public unicast address.

    IPv6 forms that carry an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, 6to4, Teredo) are
    judged by the IPv4 address inside, because that is where the packets end up.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            inner = address_problem(address.ipv4_mapped, allow_loopback=allow_loopback)
            return f"IPv4-mapped {inner}" if inner else None
        if address.sixtofour is not None:
            inner = address_problem(address.sixtofour, allow_loopback=allow_loopback)
            if inner:
                return f"6to4 {inner}"
        if address.teredo is not None:
            for embedded in address.teredo:
                inner = address_problem(embedded, allow_loopback=allow_loopback)
                if inner:
                    return f"Teredo {inner}"
    # Order matters: 127.0.0.1 is also "private" in the ipaddress module, and loopback is the one
    # category a policy may allow (the embedded emulator lives there).
    if address.is_unspecified:
        return "unspecified address"
    if address.is_loopback:
        return None if allow_loopback else "loopback address"
    if address.is_link_local:
        return "link-local address"
    if address.is_multicast:
        return "multicast address"
    if address.is_reserved:
        return "reserved address"
    if address.is_private:
        return "private address"
    if not address.is_global:
        # Catch-all for special-purpose ranges the flags above miss (e.g. 100.64.0.0/10 CGNAT).
        return "non-public address"
    return None


def _split_entry(entry: str) -> tuple[str, int | None]:
    """Split an allow-list entry ``host``, ``host:port`` or ``[v6]:port`` into host and port."""
    entry = entry.strip().lower().rstrip(".")
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return host, int(port) if port else None
    if entry.count(":") == 1:
        host, port = entry.split(":")
        return host, int(port)
    return entry, None


def normalize_allowed_hosts(entries: Sequence[str]) -> tuple[str, ...]:
    """Validate allow-list entries and return them in a canonical lowercase form."""
    out: list[str] = []
    for entry in entries:
        host, port = _split_entry(entry)
        if not host:
            raise ValueError(f"empty host in allow-list entry {entry!r}")
        ip = parse_ip(host)
        shown = f"[{ip}]" if isinstance(ip, ipaddress.IPv6Address) else str(ip or host)
        out.append(f"{shown}:{port}" if port is not None else shown)
    return tuple(out)


def host_allowed(host: str, port: int, allowed_hosts: Sequence[str]) -> bool:
    """Whether ``host:port`` matches an allow-list entry.

    A DNS entry matches itself and its subdomains (``replicate.delivery`` matches
    ``pbxt.replicate.delivery`` but not ``evilreplicate.delivery``); an IP entry matches only that
    address. An entry with a port matches only that port.
    """
    host = host.lower().rstrip(".").strip("[]")
    host_ip = parse_ip(host)
    for entry in allowed_hosts:
        entry_host, entry_port = _split_entry(entry)
        if entry_port is not None and entry_port != port:
            continue
        entry_ip = parse_ip(entry_host)
        if entry_ip is not None or host_ip is not None:
            if entry_ip is not None and host_ip is not None and entry_ip == host_ip:
                return True
            continue
        if host == entry_host or host.endswith("." + entry_host):
            return True
    return False
