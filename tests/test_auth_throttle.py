"""Failed-login throttling per client address (mailrelay.auth.throttle)."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.auth.throttle import LoginThrottle


class LoginThrottleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.throttle = LoginThrottle(self.clock.seconds, maxFailures=3, window=300.0)

    def fail(self, address: str, times: int) -> None:
        for _ in range(times):
            self.throttle.failed(address)

    def test_blockedAfterMaxFailures(self) -> None:
        self.fail("192.0.2.1", 2)
        self.assertFalse(self.throttle.blocked("192.0.2.1"))
        self.fail("192.0.2.1", 1)
        self.assertTrue(self.throttle.blocked("192.0.2.1"))
        self.assertFalse(self.throttle.blocked("192.0.2.2"))

    def test_windowPasses(self) -> None:
        self.fail("192.0.2.1", 3)
        self.clock.advance(300)
        self.assertTrue(self.throttle.blocked("192.0.2.1"))
        self.clock.advance(1)
        self.assertFalse(self.throttle.blocked("192.0.2.1"))

    def test_failuresOutsideTheWindowStartAgain(self) -> None:
        self.fail("192.0.2.1", 2)
        self.clock.advance(301)
        self.fail("192.0.2.1", 2)
        self.assertFalse(self.throttle.blocked("192.0.2.1"))

    def test_tableBounded(self) -> None:
        throttle = LoginThrottle(self.clock.seconds, maxFailures=1, maxAddresses=2)
        for address in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
            throttle.failed(address)
        self.assertFalse(throttle.blocked("192.0.2.1"))  # the oldest entry went
        self.assertTrue(throttle.blocked("192.0.2.3"))
