"""
RecentResult: a query's result shared between callers for a while (the relay-by-IP networks,
the queue counts of /metrics), on a Clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailrelay.interfaces import StoreError
from mailrelay.recent import RecentResult


class RecentResultTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.asked: list[Deferred[str]] = []
        self.recent: RecentResult[str] = RecentResult(self.ask, self.clock, maxAge=1.0)

    def ask(self) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        self.asked.append(d)
        return d

    def test_waitersShareOneRun(self) -> None:
        first, second = self.recent.get(), self.recent.get()
        self.assertEqual(len(self.asked), 1)
        self.assertNoResult(first)
        self.asked[0].callback("counts")
        self.assertEqual(self.successResultOf(first), "counts")
        self.assertEqual(self.successResultOf(second), "counts")

    def test_keptForMaxAge(self) -> None:
        self.recent.get()
        self.asked[0].callback("old")
        self.clock.advance(0.9)
        self.assertEqual(self.successResultOf(self.recent.get()), "old")
        self.assertEqual(len(self.asked), 1)
        self.clock.advance(0.1)
        fresh = self.recent.get()
        self.assertEqual(len(self.asked), 2)
        self.asked[1].callback("new")
        self.assertEqual(self.successResultOf(fresh), "new")

    def test_ageCountsFromTheStart(self) -> None:
        """A slow query's result is as old as the moment it was asked for."""
        d = self.recent.get()
        self.clock.advance(1.5)
        self.asked[0].callback("slow")
        self.successResultOf(d)
        self.recent.get()
        self.assertEqual(len(self.asked), 2)

    def test_failureGoesToItsWaitersAndIsNotKept(self) -> None:
        first, second = self.recent.get(), self.recent.get()
        self.asked[0].errback(StoreError("down"))
        self.failureResultOf(first, StoreError)
        self.failureResultOf(second, StoreError)
        again = self.recent.get()
        self.assertEqual(len(self.asked), 2)
        self.asked[1].callback("back")
        self.assertEqual(self.successResultOf(again), "back")

    def test_queryRaising(self) -> None:
        def broken() -> Any:
            raise StoreError("at once")

        self.failureResultOf(RecentResult(broken, self.clock, 1.0).get(), StoreError)
