"""
Which IP addresses the relay may open a connection to on someone else's behalf.

A recipient domain's MX, an MTA-STS policy host and a delivery-report URL are all named by
people outside the relay; an address inside the relay's own networks (loopback, private,
link-local, CGNAT, or one of those wrapped in an IPv6 form) would let them reach hosts that
only the relay can. :class:`AddressPolicy` is the one place that decides.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def isPublicAddress(address: IPAddress) -> bool:
    """
    Whether ``address`` is globally routable unicast: not loopback, private, link-local,
    CGNAT (100.64.0.0/10), documentation, reserved, multicast or IPv6 site-local, and, for an
    IPv6 address that carries an IPv4 one (IPv4-mapped, 6to4, Teredo, NAT64 ``64:ff9b::/96``,
    IPv4-compatible ``::a.b.c.d``), the IPv4 address inside is public too. An IPv6 address with
    a scope id (``fe80::1%eth0``) is never public.
    """
    addresses: list[IPAddress | None] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id or address.is_site_local:
            return False
        # An IPv4 address inside an IPv6 one reaches that IPv4 host: mapped, 6to4, Teredo,
        # NAT64 (64:ff9b::/96) and the old IPv4-compatible form (::a.b.c.d).
        teredo = address.teredo
        addresses += [address.ipv4_mapped, address.sixtofour, teredo and teredo[1]]
        if address in _NAT64 or int(address) >> 32 == 0:
            addresses.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    # Python 3.11 counts multicast as global, so it is refused by name.
    return all(one is None or (one.is_global and not one.is_multicast) for one in addresses)


class AddressPolicy:
    """
    The addresses outbound connections may go to: public ones (:func:`isPublicAddress`) and
    those inside ``allowNetworks`` (CIDR strings such as ``"127.0.0.0/8"``, for tests and for
    operators whose MX hosts are internal). Raises ValueError for a network that does not
    parse.
    """

    def __init__(self, allowNetworks: Sequence[str] = ()) -> None:
        self.allowNetworks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
            ipaddress.ip_network(network, strict=False) for network in allowNetworks
        )

    def __repr__(self) -> str:
        networks = [str(network) for network in self.allowNetworks]
        return f"AddressPolicy(allowNetworks={networks!r})"

    def allows(self, address: str | IPAddress) -> bool:
        """Whether a connection to ``address`` may be opened: it is public or inside one of
        the allowed networks. A string that is not an IP address, and an IPv6 address with a
        scope id, are refused."""
        if isinstance(address, str):
            try:
                address = ipaddress.ip_address(address)
            except ValueError:
                return False
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            # Which interface a scope id names is the host's business, not a remote party's.
            return False
        if isPublicAddress(address):
            return True
        return any(address in network for network in self.allowNetworks)
