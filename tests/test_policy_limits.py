"""Rate limiter, daily quota, client networks and relay by IP."""

import ipaddress
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.model import Account
from mailrelay.policy.limits import (
    NetworkIndex,
    RateLimiter,
    accountForNetwork,
    checkDailyQuota,
    clientAllowed,
    startOfDay,
)
from mailrelay.smtp.replies import QUOTA_EXCEEDED, RATE_EXCEEDED
from tests.test_policy_support import RefusalMixin, account


class RateTests(RefusalMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.limiter = RateLimiter(self.clock.seconds)

    def test_unlimited(self) -> None:
        unlimited = account()
        self.assertTrue(all(self.limiter.allow(unlimited) for _ in range(1000)))

    def test_burstThenRate(self) -> None:
        limited = account(rate_per_second=2)
        self.assertEqual([self.limiter.allow(limited) for _ in range(3)], [True, True, False])
        self.clock.advance(0.5)
        self.assertEqual([self.limiter.allow(limited) for _ in range(2)], [True, False])
        self.clock.advance(10)
        self.assertEqual([self.limiter.allow(limited) for _ in range(3)], [True, True, False])

    def test_shareOfTheRate(self) -> None:
        """One of four worker processes allows a quarter of the account's rate."""
        limiter = RateLimiter(self.clock.seconds, share=0.25)
        limited = account(rate_per_second=8)
        self.assertEqual([limiter.allow(limited) for _ in range(3)], [True, True, False])
        self.clock.advance(0.5)
        self.assertEqual([limiter.allow(limited) for _ in range(2)], [True, False])

    def test_slowRateHasBurstOfOne(self) -> None:
        slow = account(rate_per_second=0.1)
        self.assertTrue(self.limiter.allow(slow))
        self.assertFalse(self.limiter.allow(slow))
        self.clock.advance(9.9)
        self.assertFalse(self.limiter.allow(slow))
        self.clock.advance(0.1)
        self.assertTrue(self.limiter.allow(slow))

    def test_accountsAreSeparate(self) -> None:
        a = account(rate_per_second=1)
        b = replace(a, name="b")
        self.assertTrue(self.limiter.allow(a))
        self.assertTrue(self.limiter.allow(b))
        self.assertFalse(self.limiter.allow(a))

    def test_clockGoingBack(self) -> None:
        limited = account(rate_per_second=1)
        self.clock.advance(100)
        self.assertTrue(self.limiter.allow(limited))
        self.clock.rightNow = 50
        self.assertFalse(self.limiter.allow(limited))

    def test_check(self) -> None:
        limited = account(rate_per_second=1)
        self.limiter.check(limited)
        self.assertRefused(RATE_EXCEEDED, self.limiter.check, limited)


class QuotaTests(RefusalMixin, SynchronousTestCase):
    def test_quota(self) -> None:
        checkDailyQuota(account(), 10**9)
        limited = account(daily_quota=100)
        checkDailyQuota(limited, 99)
        e = self.assertRefused(QUOTA_EXCEEDED, checkDailyQuota, limited, 100)
        self.assertIn("100", e.reply.text)

    def test_startOfDayIsUtcMidnight(self) -> None:
        cet = timezone(timedelta(hours=1))
        self.assertEqual(
            startOfDay(datetime(2025, 3, 8, 0, 30, tzinfo=cet)),
            datetime(2025, 3, 7, tzinfo=UTC),
        )


class NetworkTests(SynchronousTestCase):
    def test_anywhereWithoutNetworks(self) -> None:
        self.assertTrue(clientAllowed(account(), "203.0.113.9"))

    def test_networks(self) -> None:
        restricted = account(networks=("192.0.2.0/24", "2001:db8::/32"))
        self.assertTrue(clientAllowed(restricted, "192.0.2.77"))
        self.assertTrue(clientAllowed(restricted, "::ffff:192.0.2.77"))
        self.assertTrue(clientAllowed(restricted, "2001:db8::5"))
        self.assertFalse(clientAllowed(restricted, "198.51.100.1"))
        self.assertFalse(clientAllowed(restricted, "/run/mailrelay.sock"))

    def test_badNetworkAdmitsNobody(self) -> None:
        self.assertFalse(clientAllowed(account(networks=("nonsense",)), "192.0.2.1"))

    def test_mostSpecificNetworkWins(self) -> None:
        wide = account(networks=("10.0.0.0/8",))
        narrow = replace(wide, name="erp", networks=("10.1.2.0/24",))
        self.assertEqual(accountForNetwork([wide, narrow], "10.1.2.3"), narrow)
        self.assertEqual(accountForNetwork([narrow, wide], "10.9.9.9"), wide)
        self.assertIsNone(accountForNetwork([wide, narrow], "192.0.2.1"))

    def test_ambiguityMeansNobody(self) -> None:
        a = account(networks=("10.1.2.0/24",))
        b = replace(a, name="b")
        self.assertIsNone(accountForNetwork([a, b], "10.1.2.3"))
        # A more specific network of either resolves it.
        c = replace(a, name="c", networks=("10.1.2.3/32",))
        self.assertEqual(accountForNetwork([a, b, c], "10.1.2.3"), c)

    def test_disabledAccountsSkipped(self) -> None:
        disabled = account(networks=("10.0.0.0/8",), enabled=False)
        self.assertIsNone(accountForNetwork([disabled], "10.1.1.1"))
        self.assertIsNone(accountForNetwork([account()], "10.1.1.1"))


def scanForNetwork(accounts: list[Account], ip: str) -> Account | None:
    """The rule of relay by IP written as the plain scan of every account's networks: the
    enabled account with the longest matching prefix, None if two accounts share it."""
    address = ipaddress.ip_address(ip)
    matches = [
        (ipaddress.ip_network(text, strict=False).prefixlen, candidate)
        for candidate in accounts
        if candidate.enabled
        for text in candidate.networks
        if address in ipaddress.ip_network(text, strict=False)
    ]
    if not matches:
        return None
    longest = max(prefix for prefix, _ in matches)
    names = {candidate.name for prefix, candidate in matches if prefix == longest}
    if len(names) > 1:
        return None
    return next(candidate for prefix, candidate in matches if prefix == longest)


# Addresses and networks within 10.0.0.0/16, so that they overlap often.
_addresses = st.integers(0, 2**16 - 1).map(lambda n: str(ipaddress.IPv4Address(0x0A000000 + n)))
_networks = st.tuples(_addresses, st.integers(8, 32)).map(lambda p: f"{p[0]}/{p[1]}")


class NetworkIndexTests(SynchronousTestCase):
    """The index finds what the scan of every account finds."""

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.tuples(st.lists(_networks, max_size=3), st.booleans()),
            max_size=12,
        ),
        st.lists(_addresses, min_size=1, max_size=8),
    )
    def test_sameAsScanningEveryAccount(
        self, specs: list[tuple[list[str], bool]], clients: list[str]
    ) -> None:
        accounts = [
            replace(account(networks=tuple(networks), enabled=enabled), name=f"a{i}")
            for i, (networks, enabled) in enumerate(specs)
        ]
        index = NetworkIndex(accounts)
        for client in clients:
            self.assertEqual(index.accountFor(client), scanForNetwork(accounts, client))

    def test_ipv6AndMappedAddresses(self) -> None:
        v6 = replace(account(networks=("2001:db8::/32",)), name="v6")
        v4 = replace(account(networks=("192.0.2.0/24",)), name="v4")
        index = NetworkIndex([v6, v4])
        self.assertEqual(index.accountFor("2001:db8::1"), v6)
        self.assertEqual(index.accountFor("::ffff:192.0.2.9"), v4)
        self.assertEqual(index.accountFor("[2001:db8::2]"), v6)
        self.assertIsNone(index.accountFor("2001:db9::1"))
        self.assertIsNone(index.accountFor("/run/mailrelay.sock"))
