"""Where `http` nodes may go (docs/security.md#nodes-that-cannot-escape): the operator's
allowlist (--http-allow) of hosts and URL prefixes, checked for every request a node makes,
redirects included; and, for any host the allowlist does not name, the addresses it resolves
to, checked when the connection is made (so a DNS answer cannot change between the check and
the connect): loopback, link-local, cloud metadata, unspecified, multicast and reserved
addresses are refused."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = ["HttpPolicy", "Refused", "refused_kind"]

# Cloud metadata services outside the link-local range (AWS's IPv6 one, Alibaba's).
METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("fd00:ec2::254"), ipaddress.ip_address("100.100.100.200")}
)


class Refused(Exception):
    """A request the policy does not let an http node make."""


def refused_kind(address: str) -> str | None:
    """Why an address is no place for an http node, or None."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES or str(ip) == "169.254.169.254":
        return "cloud metadata"
    for kind, hit in (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("unspecified", ip.is_unspecified),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
    ):
        if hit:
            return kind
    return None


@dataclass(frozen=True, slots=True)
class HttpPolicy:
    """The operator's rules for http nodes."""

    allow: Sequence[str] = ()
    """Hosts ("api.example.com") and URL prefixes ("https://api.example.com/v1/"). Empty: any
    URL whose host resolves to no refused address. Otherwise only the URLs they match, and a
    host they name may be any address (loopback too)."""
    max_bytes: int = 10 * 1024 * 1024
    """The largest response body a node reads."""
    trusted_hosts: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        hosts = {
            (urlsplit(entry).hostname or "") if "://" in entry else entry.lower()
            for entry in self.allow
        }
        object.__setattr__(self, "trusted_hosts", frozenset(hosts - {""}))

    def check_url(self, url: str) -> None:
        """Refused unless the allowlist is empty or matches the URL."""
        if not self.allow:
            return
        text, host = url, (urlsplit(url).hostname or "").lower()
        for entry in self.allow:
            if ("://" in entry and text.startswith(entry)) or (
                "://" not in entry and host == entry.lower()
            ):
                return
        raise Refused(f"{url} is not in the engine's --http-allow")

    def check_address(self, host: str, address: str) -> None:
        if host.lower() in self.trusted_hosts:
            return
        kind = refused_kind(address)
        if kind is not None:
            raise Refused(
                f"{host} is {address}, a {kind} address: http nodes may not reach it unless "
                "--http-allow names the host"
            )
