"""Which addresses outbound connections may go to."""

from __future__ import annotations

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.netaddress import AddressPolicy, isPublicAddress

PUBLIC = ("8.8.8.8", "1.1.1.1", "2606:4700::1111", "2a00:1450:4001:82b::200e")

NOT_PUBLIC = (
    "127.0.0.1",  # loopback
    "0.0.0.0",
    "10.0.0.1",  # private
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",  # link-local (cloud metadata)
    "100.64.0.1",  # CGNAT
    "100.127.255.254",
    "192.0.2.1",  # documentation
    "224.0.0.1",  # multicast
    "239.255.255.250",
    "255.255.255.255",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",  # unique local
    "fec0::1",  # site-local
    "ff02::1",  # multicast
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:10.0.0.1",
    "::127.0.0.1",  # IPv4-compatible
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2002:a00:1::",  # 6to4 of 10.0.0.1
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo, client 10.0.0.1
)


class IsPublicAddressTests(SynchronousTestCase):
    def test_public(self) -> None:
        for text in PUBLIC:
            self.assertTrue(isPublicAddress(ipaddress.ip_address(text)), text)

    def test_notPublic(self) -> None:
        for text in NOT_PUBLIC:
            self.assertFalse(isPublicAddress(ipaddress.ip_address(text)), text)

    def test_publicInsideIPv6(self) -> None:
        """An IPv6 form of a public IPv4 address is judged by that IPv4 address: 6to4 of
        8.8.8.8 is as public as 8.8.8.8."""
        self.assertTrue(isPublicAddress(ipaddress.IPv6Address("2002:808:808::1")))

    def test_scopeId(self) -> None:
        self.assertFalse(isPublicAddress(ipaddress.IPv6Address("2606:4700::1111%eth0")))


class AddressPolicyTests(SynchronousTestCase):
    def test_default(self) -> None:
        """With no networks allowed, exactly the public addresses pass, as strings or
        ipaddress values."""
        policy = AddressPolicy()
        for text in PUBLIC:
            self.assertTrue(policy.allows(text), text)
            self.assertTrue(policy.allows(ipaddress.ip_address(text)), text)
        for text in NOT_PUBLIC:
            self.assertFalse(policy.allows(text), text)
            self.assertFalse(policy.allows(ipaddress.ip_address(text)), text)

    def test_allowNetworks(self) -> None:
        policy = AddressPolicy(["127.0.0.0/8", "10.1.0.0/16", "fd00::/8"])
        self.assertTrue(policy.allows("127.0.0.1"))
        self.assertTrue(policy.allows("127.1.2.3"))
        self.assertTrue(policy.allows("10.1.2.3"))
        self.assertTrue(policy.allows("fd12::1"))
        self.assertTrue(policy.allows("8.8.8.8"))
        self.assertFalse(policy.allows("10.2.0.1"))
        self.assertFalse(policy.allows("::1"))
        self.assertFalse(policy.allows("192.168.1.1"))
        # The IPv6 forms of an allowed IPv4 address are not allowed by it.
        self.assertFalse(policy.allows("::ffff:127.0.0.1"))

    def test_notAnAddress(self) -> None:
        policy = AddressPolicy(["0.0.0.0/0", "::/0"])
        for text in ("", "localhost", "example.org", "127.0.0.1:25", "[::1]", "1.2.3"):
            self.assertFalse(policy.allows(text), text)

    def test_scopeId(self) -> None:
        """An address with a scope id is refused even where its network is allowed."""
        policy = AddressPolicy(["fe80::/10"])
        self.assertTrue(policy.allows("fe80::1"))
        self.assertFalse(policy.allows("fe80::1%eth0"))
        self.assertFalse(policy.allows(ipaddress.IPv6Address("fe80::1%eth0")))

    def test_badNetwork(self) -> None:
        self.assertRaises(ValueError, AddressPolicy, ["10.0.0.0/33"])
        self.assertRaises(ValueError, AddressPolicy, ["intranet"])

    def test_hostBitsSet(self) -> None:
        """``10.1.2.3/16`` means 10.1.0.0/16, as operators write it."""
        self.assertTrue(AddressPolicy(["10.1.2.3/16"]).allows("10.1.200.1"))
