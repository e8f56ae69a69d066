"""Which address a request comes from, for the rate limit, the connection caps and the logs.

The TCP peer, always, unless the operator named that peer as a proxy it trusts
(``serve --trusted-proxy``). Only then is ``X-Forwarded-For`` read, from the right: each
trusted proxy appended the address it received the connection from, so the right-most
address that is not itself a trusted proxy is the client. Everything left of it was written
by that client and proves nothing. ``Forwarded`` (RFC 7239) is never read: one header, one
strict parser.
"""

import functools
import ipaddress
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


LONGEST_IP_TEXT = 45  # 0000:0000:0000:0000:0000:ffff:255.255.255.255


def parse_ip(text: str) -> Optional[IPAddress]:
    """An IP literal, IPv4-mapped IPv6 as IPv4; None for anything else (ports, brackets,
    names, ``unknown``, surrounding spaces, an IPv6 ``%zone``, which would let one address be
    written many ways)."""
    if len(text) > LONGEST_IP_TEXT:  # no IP literal is longer; never remembered
        return None
    return _parse_short_ip(text)


@functools.lru_cache(maxsize=4096)
def _parse_short_ip(text: str) -> Optional[IPAddress]:
    """parse_ip remembered for the last 4096 texts (at most 45 characters each; the addresses
    are immutable): a request asks up to four times (connection caps, handler, access log)."""
    if "%" in text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedProxies:
    """The proxies whose ``X-Forwarded-For`` is believed: addresses and CIDR networks."""

    def __init__(self, networks: Sequence[IPNetwork] = ()) -> None:
        self.networks = tuple(networks)

    @classmethod
    def parse(cls, text: str) -> "TrustedProxies":
        """A comma list of IP addresses or networks (10.0.0.5, 10.1.0.0/16, fd00::/8);
        ValueError names the bad entry."""
        networks = []
        for entry in text.split(","):
            entry = entry.strip()
            address = parse_ip(entry)
            try:
                network = ipaddress.ip_network(address if address is not None else entry, strict=True)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network such as 10.0.0.5 "
                                 f"or 10.1.0.0/16 (host bits must be zero)") from None
            if network.prefixlen == 0:
                raise ValueError(f"{entry!r} would trust every address: anyone could forge "
                                 f"X-Forwarded-For")
            networks.append(network)
        return cls(networks)

    def __add__(self, other: "TrustedProxies") -> "TrustedProxies":
        return TrustedProxies(self.networks + tuple(n for n in other.networks if n not in self.networks))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: Optional[IPAddress]) -> bool:
        return address is not None and any(address in network for network in self.networks)

    def __str__(self) -> str:
        return ",".join(str(n) for n in self.networks) or "none"


NO_PROXY = TrustedProxies()


def forwarded_chain(headers: Iterable[Sequence[bytes]]) -> Sequence[str]:
    """The entries of every ``X-Forwarded-For`` header (ASGI raw headers), in order."""
    values = [value.decode("latin-1") for name, value in headers if name == b"x-forwarded-for"]
    if not values:
        return ()
    return [entry.strip(" \t") for entry in ",".join(values).split(",")]


def client_address(scope: Mapping[str, Any], trusted: TrustedProxies = NO_PROXY) -> str:
    """The client address of an ASGI request (canonical text form): the TCP peer, or, when
    the peer is a trusted proxy, the right-most ``X-Forwarded-For`` entry that is not a
    trusted proxy. A malformed entry ends the walk at the last address vouched for."""
    client = scope.get("client")
    if not client:
        return "-"
    current = parse_ip(str(client[0]))
    if current is None:
        return str(client[0])
    if current not in trusted:
        return str(current)
    for entry in reversed(forwarded_chain(scope.get("headers") or ())):
        address = parse_ip(entry)
        if address is None:
            break
        current = address
        if address not in trusted:
            break
    return str(current)
