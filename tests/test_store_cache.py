"""
The account-data cache both store backends share (:mod:`mailrelay.store.cache`), on a
``task.Clock``: no store, no threads.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.interfaces import StoreError
from mailrelay.store.cache import AccountCache
from mailrelay.store.common import ACCOUNT_CACHE_ENTRIES, ACCOUNT_CACHE_SECONDS


class Reads:
    """A lookup that counts how often it runs and gives ``value``."""

    def __init__(self, value: object = "alice") -> None:
        self.value = value
        self.count = 0

    def __call__(self) -> Deferred[object]:
        self.count += 1
        return succeed(self.value)


class AccountCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.cache = AccountCache(self.clock)

    def test_rememberedForAMoment(self) -> None:
        """A second lookup of the same key within ACCOUNT_CACHE_SECONDS gives what the first
        read gave, without reading; one at that time reads again."""
        read = Reads()
        self.assertEqual(self.successResultOf(self.cache.lookup(("account", "a"), read)), "alice")
        self.clock.advance(ACCOUNT_CACHE_SECONDS - 0.001)
        read.value = "changed"
        self.assertEqual(self.successResultOf(self.cache.lookup(("account", "a"), read)), "alice")
        self.assertEqual(read.count, 1)
        self.clock.advance(0.001)
        self.assertEqual(self.successResultOf(self.cache.lookup(("account", "a"), read)), "changed")
        self.assertEqual(read.count, 2)

    def test_timeCountsFromTheAsking(self) -> None:
        """The moment counts from when the lookup was asked for, not from its answer."""
        pending: Deferred[object] = Deferred()
        d = self.cache.lookup(("account", "a"), lambda: pending)
        self.clock.advance(ACCOUNT_CACHE_SECONDS)
        pending.callback("late")
        self.assertEqual(self.successResultOf(d), "late")
        read = Reads("fresh")
        self.assertEqual(self.successResultOf(self.cache.lookup(("account", "a"), read)), "fresh")

    def test_keysApart(self) -> None:
        """Each key has its own remembered value."""
        self.successResultOf(self.cache.lookup(("account", "a"), Reads("A")))
        self.successResultOf(self.cache.lookup(("apikey", "a"), Reads("K")))
        self.assertEqual(self.successResultOf(self.cache.lookup(("account", "a"), Reads())), "A")
        self.assertEqual(self.successResultOf(self.cache.lookup(("apikey", "a"), Reads())), "K")

    def test_failureNotRemembered(self) -> None:
        """A failed read is passed on and not remembered: the next lookup reads again."""
        d = self.cache.lookup(("account", "a"), lambda: fail(StoreError("down")))
        self.failureResultOf(d, StoreError)
        self.assertEqual(len(self.cache), 0)
        self.assertEqual(
            self.successResultOf(self.cache.lookup(("account", "a"), Reads())), "alice"
        )

    def test_changeForgetsBeforeAndAfter(self) -> None:
        """A change forgets everything remembered when it starts, and what was remembered
        while it ran when it ends."""
        self.successResultOf(self.cache.lookup(("account", "a"), Reads()))
        written: Deferred[str] = Deferred()
        d = self.cache.change(lambda: written)
        self.assertEqual(len(self.cache), 0)
        self.successResultOf(self.cache.lookup(("account", "a"), Reads("meanwhile")))
        self.assertEqual(len(self.cache), 1)
        written.callback("done")
        self.assertEqual(self.successResultOf(d), "done")
        self.assertEqual(len(self.cache), 0)

    def test_failedChangeForgetsToo(self) -> None:
        """A change that fails forgets as one that succeeds does, and its failure is passed
        on."""
        written: Deferred[str] = Deferred()
        d = self.cache.change(lambda: written)
        self.successResultOf(self.cache.lookup(("account", "a"), Reads()))
        written.errback(StoreError("refused"))
        self.failureResultOf(d, StoreError)
        self.assertEqual(len(self.cache), 0)

    def test_boundedEntries(self) -> None:
        """Past ACCOUNT_CACHE_ENTRIES remembered lookups, everything is forgotten first."""
        for i in range(ACCOUNT_CACHE_ENTRIES):
            self.successResultOf(self.cache.lookup(("account", str(i)), Reads()))
        self.assertEqual(len(self.cache), ACCOUNT_CACHE_ENTRIES)
        self.successResultOf(self.cache.lookup(("account", "one more"), Reads()))
        self.assertEqual(len(self.cache), 1)

    def test_limitsGiven(self) -> None:
        """The time and the number of entries can be given."""
        cache = AccountCache(self.clock, seconds=5.0, entries=2)
        read = Reads()
        self.successResultOf(cache.lookup("a", read))
        self.clock.advance(4.9)
        self.successResultOf(cache.lookup("a", read))
        self.assertEqual(read.count, 1)
        self.successResultOf(cache.lookup("b", read))
        self.successResultOf(cache.lookup("c", read))
        self.assertEqual(len(cache), 1)
