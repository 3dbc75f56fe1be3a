"""
Routing in mx mode against a real DNS server on loopback (tests/dns_server.py), queried by
the twisted.names client that :func:`makeResolver` builds.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.names.resolve import ResolverChain
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailrelay.delivery.route import Candidate
from mailrelay.delivery.smtp.mx import MXResolver, RouteError, makeResolver
from mailrelay.netaddress import AddressPolicy
from tests.dns_server import NO_ANSWER, SERVFAIL, DNSServer, startDNSServer

PUBLIC_A = "192.0.0.9"  # not 192.0.2.x: documentation ranges are not public
LOOPBACK = AddressPolicy(["127.0.0.0/8", "::1/128"])


def noShuffle(items: list[Any]) -> None:
    pass


def reverse(items: list[Any]) -> None:
    items.reverse()


class MXResolverTests(TestCase):
    async def resolver(
        self,
        records: dict[str, Any],
        addresses: AddressPolicy = LOOPBACK,
        shuffle: Any = noShuffle,
        timeout: tuple[float, ...] = (2,),
    ) -> tuple[MXResolver, DNSServer]:
        dns = await startDNSServer(self, records)
        resolver = makeResolver([dns.nameserver], reactor, timeout=timeout)
        return MXResolver(resolver, addresses, port=2525, shuffle=shuffle), dns

    async def assertRouteError(self, mx: MXResolver, domain: str, permanent: bool) -> RouteError:
        try:
            candidates = await mx.route(domain)
        except RouteError as e:
            self.assertEqual(e.permanent, permanent, e.reason)
            self.assertTrue(e.reason.lower().startswith(domain.lower()), e.reason)
            return e
        self.fail(f"{domain} routed to {candidates}")

    async def test_preferenceOrder(self) -> None:
        """MX hosts go lowest preference first, whatever order DNS lists them in; each host
        with its AAAA and A addresses."""
        mx, _ = await self.resolver(
            {
                "example.test": {"MX": [(20, "mx2.example.test"), (10, "mx1.example.test")]},
                "mx1.example.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
                "mx2.example.test": {"A": ["127.0.0.2", "127.0.0.3"]},
            }
        )
        self.assertEqual(
            await mx.route("example.test"),
            [
                Candidate("mx1.example.test", "::1", 2525),
                Candidate("mx1.example.test", "127.0.0.1", 2525),
                Candidate("mx2.example.test", "127.0.0.2", 2525),
                Candidate("mx2.example.test", "127.0.0.3", 2525),
            ],
        )

    async def test_equalPreferencesShuffled(self) -> None:
        """Hosts of one preference are put in the order the shuffle gives, each group on
        its own."""
        shuffled: list[list[str]] = []

        def shuffle(items: list[Any]) -> None:
            shuffled.append(list(items))
            items.reverse()

        mx, _ = await self.resolver(
            {
                "example.test": {
                    "MX": [
                        (10, "a.example.test"),
                        (10, "b.example.test"),
                        (5, "first.example.test"),
                        (20, "c.example.test"),
                        (20, "d.example.test"),
                    ]
                },
                "first.example.test": {"A": ["127.0.0.1"]},
                "a.example.test": {"A": ["127.0.0.2"]},
                "b.example.test": {"A": ["127.0.0.3"]},
                "c.example.test": {"A": ["127.0.0.4"]},
                "d.example.test": {"A": ["127.0.0.5"]},
            },
            shuffle=shuffle,
        )
        candidates = await mx.route("example.test")
        self.assertEqual(
            [one.host for one in candidates],
            [
                "first.example.test",
                "b.example.test",
                "a.example.test",
                "d.example.test",
                "c.example.test",
            ],
        )
        self.assertEqual(
            sorted(shuffled),
            [
                ["a.example.test", "b.example.test"],
                ["c.example.test", "d.example.test"],
                ["first.example.test"],
            ],
        )

    async def test_implicitMX(self) -> None:
        """No MX records: the domain's own addresses, as if it were its MX (RFC 5321 §5.1)."""
        mx, dns = await self.resolver({"example.test": {"A": ["127.0.0.7"], "AAAA": ["::1"]}})
        self.assertEqual(
            await mx.route("Example.Test."),
            [
                Candidate("example.test", "::1", 2525),
                Candidate("example.test", "127.0.0.7", 2525),
            ],
        )
        self.assertIn(("example.test", "MX"), dns.queries)

    async def test_implicitMXWithoutAddress(self) -> None:
        mx, _ = await self.resolver({"example.test": {"TXT": ["hello"]}})
        e = await self.assertRouteError(mx, "example.test", permanent=True)
        self.assertIn("no address", e.reason)

    async def test_nullMX(self) -> None:
        mx, dns = await self.resolver({"example.test": {"MX": [(0, ".")], "A": ["127.0.0.1"]}})
        e = await self.assertRouteError(mx, "example.test", permanent=True)
        self.assertEqual(e.reason, "example.test: null MX (RFC 7505): the domain accepts no mail")
        self.assertEqual(dns.queries, [("example.test", "MX")])

    async def test_nullMXAmongOthers(self) -> None:
        """A null MX next to real ones (a misconfiguration) leaves the real ones."""
        mx, _ = await self.resolver(
            {
                "example.test": {"MX": [(0, "."), (10, "mx.example.test")]},
                "mx.example.test": {"A": ["127.0.0.1"]},
            }
        )
        self.assertEqual(
            await mx.route("example.test"), [Candidate("mx.example.test", "127.0.0.1", 2525)]
        )

    async def test_nxdomain(self) -> None:
        mx, _ = await self.resolver({})
        e = await self.assertRouteError(mx, "nowhere.test", permanent=True)
        self.assertIn("NXDOMAIN", e.reason)

    async def test_servfail(self) -> None:
        mx, _ = await self.resolver({"example.test": SERVFAIL})
        e = await self.assertRouteError(mx, "example.test", permanent=False)
        self.assertIn("SERVFAIL", e.reason)

    async def test_timeout(self) -> None:
        mx, _ = await self.resolver({"example.test": NO_ANSWER}, timeout=(0.2, 0.2))
        e = await self.assertRouteError(mx, "example.test", permanent=False)
        self.assertIn("timeout", e.reason)

    async def test_mxHostNonPublic(self) -> None:
        """An MX pointing into the relay's own networks is refused: a permanent failure that
        says so."""
        records = {
            "example.test": {"MX": [(10, "mx.example.test")]},
            "mx.example.test": {"A": ["10.0.0.1", "127.0.0.1"], "AAAA": ["::1"]},
        }
        mx, _ = await self.resolver(records, addresses=AddressPolicy())
        e = await self.assertRouteError(mx, "example.test", permanent=True)
        self.assertIn("only non-public addresses", e.reason)
        self.assertIn("10.0.0.1", e.reason)

    async def test_allowNetworks(self) -> None:
        """Addresses inside ``allow_networks`` are used; the others are dropped."""
        records = {
            "example.test": {"MX": [(10, "mx.example.test")]},
            "mx.example.test": {"A": ["10.0.0.1", "127.0.0.1", "192.168.1.1"]},
        }
        mx, _ = await self.resolver(records, addresses=AddressPolicy(["10.0.0.0/8"]))
        self.assertEqual(
            await mx.route("example.test"), [Candidate("mx.example.test", "10.0.0.1", 2525)]
        )

    async def test_publicAddresses(self) -> None:
        """Public addresses pass without any allowed network."""
        records = {
            "example.test": {"MX": [(10, "mx.example.test")]},
            "mx.example.test": {"A": [PUBLIC_A, "127.0.0.1"], "AAAA": ["2606:4700::1111"]},
        }
        mx, _ = await self.resolver(records, addresses=AddressPolicy())
        self.assertEqual(
            [one.address for one in await mx.route("example.test")],
            ["2606:4700::1111", PUBLIC_A],
        )

    async def test_hostLookupFailsForOne(self) -> None:
        """A host whose lookups fail is skipped; another host's addresses are used, and one
        family failing keeps the other's."""
        mx, _ = await self.resolver(
            {
                "example.test": {"MX": [(10, "gone.example.test"), (20, "half.example.test")]},
                "half.example.test": {"A": ["127.0.0.2"], "AAAA": SERVFAIL},
            }
        )
        self.assertEqual(
            await mx.route("example.test"), [Candidate("half.example.test", "127.0.0.2", 2525)]
        )

    async def test_hostLookupsAllFailTemporarily(self) -> None:
        mx, _ = await self.resolver(
            {
                "example.test": {"MX": [(10, "a.example.test"), (20, "b.example.test")]},
                "a.example.test": SERVFAIL,
            }
        )
        e = await self.assertRouteError(mx, "example.test", permanent=False)
        self.assertIn("SERVFAIL", e.reason)

    async def test_hostLookupsAllNXDOMAIN(self) -> None:
        mx, _ = await self.resolver({"example.test": {"MX": [(10, "gone.example.test")]}})
        e = await self.assertRouteError(mx, "example.test", permanent=True)
        self.assertIn("gone.example.test", e.reason)

    async def test_cname(self) -> None:
        """A domain that is an alias routes as its target; an MX host may be an alias."""
        mx, _ = await self.resolver(
            {
                "alias.test": {"CNAME": "example.test"},
                "example.test": {"MX": [(10, "mx.example.test")]},
                "mx.example.test": {"CNAME": "real.example.test"},
                "real.example.test": {"A": ["127.0.0.1"]},
            }
        )
        self.assertEqual(
            await mx.route("alias.test"), [Candidate("mx.example.test", "127.0.0.1", 2525)]
        )

    async def test_sameAddressTwice(self) -> None:
        """Two MX names for one address give one candidate, the better one."""
        mx, _ = await self.resolver(
            {
                "example.test": {"MX": [(10, "a.example.test"), (20, "b.example.test")]},
                "a.example.test": {"A": ["127.0.0.1"]},
                "b.example.test": {"A": ["127.0.0.1"]},
            }
        )
        self.assertEqual(
            await mx.route("example.test"), [Candidate("a.example.test", "127.0.0.1", 2525)]
        )

    async def test_recordsChange(self) -> None:
        """The fixture answers from its live records: a change shows on the next route."""
        mx, dns = await self.resolver({"example.test": {"A": ["127.0.0.1"]}})
        self.assertEqual([one.address for one in await mx.route("example.test")], ["127.0.0.1"])
        dns.records["example.test"] = {"A": ["127.0.0.2"]}
        self.assertEqual([one.address for one in await mx.route("example.test")], ["127.0.0.2"])

    async def test_literals(self) -> None:
        """An address literal is its own route, checked by the address policy, with no DNS."""
        mx, dns = await self.resolver({})
        self.assertEqual(await mx.route("[127.0.0.1]"), [Candidate("127.0.0.1", "127.0.0.1", 2525)])
        self.assertEqual(await mx.route("[IPv6:0::1]"), [Candidate("::1", "::1", 2525)])
        e = await self.assertRouteError(mx, "[10.0.0.1]", permanent=True)
        self.assertIn("only non-public addresses", e.reason)
        await self.assertRouteError(mx, "[IPv6:::ffff:10.0.0.1]", permanent=True)
        await self.assertRouteError(mx, "[not.an.address]", permanent=True)
        self.assertEqual(dns.queries, [])

    async def test_publicLiteral(self) -> None:
        mx, _ = await self.resolver({}, addresses=AddressPolicy())
        self.assertEqual(
            await mx.route("[IPv6:2606:4700::1111]"),
            [Candidate("2606:4700::1111", "2606:4700::1111", 2525)],
        )
        await self.assertRouteError(mx, "[127.0.0.1]", permanent=True)


class MakeResolverTests(SynchronousTestCase):
    def test_nameservers(self) -> None:
        resolver: Any = makeResolver(
            ["127.0.0.1:5353", "192.0.2.53", "[2001:db8::53]:5300", "2001:db8::1"], reactor
        )
        self.assertEqual(
            resolver.servers,
            [
                ("127.0.0.1", 5353),
                ("192.0.2.53", 53),
                ("2001:db8::53", 5300),
                ("2001:db8::1", 53),
            ],
        )

    def test_system(self) -> None:
        """No nameservers: /etc/hosts, then a cache, then /etc/resolv.conf's servers, all on
        the given reactor."""
        clock = MemoryReactorClock()
        resolver: Any = makeResolver([], clock)
        self.assertIsInstance(resolver, ResolverChain)
        self.assertEqual(
            [type(one).__name__ for one in resolver.resolvers],
            ["Resolver", "CacheResolver", "Resolver"],
        )
        self.assertIs(resolver.resolvers[2]._reactor, clock)

    def test_badNameserver(self) -> None:
        for text in ("ns.example.org", "127.0.0.1:x", "127.0.0.1:0", "[::1]x", "1.2.3.4:70000"):
            self.assertRaises(ValueError, makeResolver, [text], reactor)
