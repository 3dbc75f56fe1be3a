"""
The delivery loop (:class:`~mailrelay.delivery.service.DeliveryService`) on a Clock and the
in-memory store: what it claims starts a few attempts a turn, and what it claimed but had not
started when it stops goes back to the queue.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailrelay.delivery.service import START_SLICE, DeliveryService, LoopSettings
from mailrelay.model import Delivery, Notification, QueueStats, Recipient
from mailrelay.testing import MemoryStore


class HeldEngine:
    """An engine whose attempts end when the test says: what is in flight stays in flight."""

    def __init__(self) -> None:
        self.attempts: list[Deferred[None]] = []

    def deliver(self, delivery: Delivery) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.attempts.append(d)
        return d

    def start(self, delivery: Delivery) -> tuple[tuple[()], tuple[()]]:
        return (), ()  # nothing written with the claim


def enqueue(store: MemoryStore, clock: Clock, count: int) -> None:
    for _ in range(count):
        notification = Notification(
            notification_id=store.nextNotificationId(),
            account="acme",
            sender="app@acme.example",
            recipients=(Recipient(address="alice@example.com", channel="email"),),
            size=10,
            received_at=datetime.fromtimestamp(clock.seconds(), UTC),
        )
        store.enqueue(notification, b"Subject: x\r\n\r\nx\r\n")


class TurnClock(Clock):
    """A Clock that also runs one turn of a reactor: the calls due when the turn begins,
    not those they schedule for now (``advance`` runs those too)."""

    def turn(self) -> None:
        due = [call for call in self.calls if call.getTime() <= self.seconds()]
        for call in due:
            self.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)


class LoopTestCase(TestCase):
    """A started delivery loop on a TurnClock, the in-memory store and a HeldEngine."""

    settings = LoopSettings(concurrency=20, batch=3 * START_SLICE, pollInterval=0.5)

    def setUp(self) -> None:
        self.clock = TurnClock()
        self.clock.advance(1_800_000_000)
        self.store = MemoryStore(self.clock)
        self.engine = HeldEngine()
        self.service = DeliveryService(
            self.store,
            self.engine,  # type: ignore[arg-type]
            self.clock,
            self.settings,
        )
        self.service.startService()


class StartInSlicesTests(LoopTestCase):
    def test_aFewAttemptsStartATurn(self) -> None:
        """A claim of three slices starts one slice now and one in each of the next two
        turns; those claimed count as in flight from the claim on."""
        enqueue(self.store, self.clock, 3 * START_SLICE)
        self.clock.turn()  # the first look: claims all of them
        started = [len(self.engine.attempts)]
        inFlight = [self.service.inFlight]
        for _ in range(3):
            self.clock.turn()
            started.append(len(self.engine.attempts))
            inFlight.append(self.service.inFlight)
        self.assertEqual(started, [START_SLICE, 2 * START_SLICE, 3 * START_SLICE, 3 * START_SLICE])
        self.assertEqual(inFlight, [3 * START_SLICE] * 4)
        self.assertEqual(
            self.successResultOf(self.store.stats()), QueueStats(queued=0, deferred=0, in_flight=12)
        )
        stopped = self.service.stopService()
        for attempt in self.engine.attempts:
            attempt.callback(None)
        self.successResultOf(stopped)

    def test_stopGivesBackWhatDidNotStart(self) -> None:
        """Stopped after the first slice started: the others never start, and their leases
        are given back, so they are queued again for the next start."""
        enqueue(self.store, self.clock, 3 * START_SLICE)
        self.clock.turn()
        self.assertEqual(len(self.engine.attempts), START_SLICE)
        stopped = self.service.stopService()
        for attempt in self.engine.attempts:
            attempt.callback(None)  # ended (without an outcome: still in flight in the store)
        self.clock.advance(0)
        self.successResultOf(stopped)
        self.clock.advance(1)
        self.assertEqual(len(self.engine.attempts), START_SLICE)
        self.assertEqual(
            self.successResultOf(self.store.stats()),
            QueueStats(queued=2 * START_SLICE, deferred=0, in_flight=START_SLICE),
        )

    def test_stopWaitsForTheClaimUnderWay(self) -> None:
        """Stopped while a claim is under way: what the claim gives never starts and goes
        back to the queue before the loop says it has stopped."""
        enqueue(self.store, self.clock, START_SLICE + 1)
        claims: list[Deferred[None]] = []
        claimDue = self.store.claimDue

        def heldClaim(*args: Any) -> Deferred[list[Delivery]]:
            d: Deferred[None] = Deferred()
            claims.append(d)
            return d.addCallback(lambda _: claimDue(*args))

        self.store.claimDue = heldClaim  # type: ignore[assignment]
        self.clock.turn()
        (claim,) = claims
        stopped = self.service.stopService()
        self.assertNoResult(stopped)
        claim.callback(None)
        self.clock.advance(0)
        self.successResultOf(stopped)
        self.assertEqual(self.engine.attempts, [])
        self.assertEqual(
            self.successResultOf(self.store.stats()),
            QueueStats(queued=START_SLICE + 1, deferred=0, in_flight=0),
        )


class LeaseRenewalTests(LoopTestCase):
    """Attempts that take longer than a lease keep their notifications: one timer renews
    every lease in flight each ``leaseSeconds / 3``."""

    settings = LoopSettings(concurrency=20, batch=START_SLICE, pollInterval=0.5, leaseSeconds=30)

    def claimable(self) -> int:
        """How many notifications another claimer would get now."""
        return len(self.successResultOf(self.store.claimDue(100, 30)))

    def test_longAttemptsKeepTheirLeases(self) -> None:
        enqueue(self.store, self.clock, 2)
        self.clock.turn()
        self.assertEqual(len(self.engine.attempts), 2)
        for _ in range(9):  # 90 s: three leases' worth
            self.clock.advance(10)
            self.assertEqual(self.claimable(), 0)
        # One ends without an outcome: no longer renewed, its lease runs out and the loop
        # claims it again; the other's stays.
        self.engine.attempts[0].callback(None)
        self.clock.advance(29)
        self.assertEqual(len(self.engine.attempts), 2)
        self.clock.advance(1)
        self.assertEqual(len(self.engine.attempts), 3)
        stopped = self.service.stopService()
        for attempt in self.engine.attempts[1:]:
            attempt.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ClaimSizeTests(LoopTestCase):
    """Through a backlog the loop claims once half a batch of slots is free, not as each
    attempt ends: every claim is a commit. Caught up, a free slot is filled at once."""

    settings = LoopSettings(concurrency=20, batch=12, pollInterval=0.5)

    def setUp(self) -> None:
        super().setUp()
        self.asked: list[int] = []
        claimDue = self.store.claimDue

        def countedClaim(limit: int, *args: Any) -> Deferred[list[Delivery]]:
            self.asked.append(limit)
            return claimDue(limit, *args)

        self.store.claimDue = countedClaim  # type: ignore[assignment]
        self.addCleanup(self.stop)

    def stop(self) -> None:
        stopped = self.service.stopService()
        for attempt in self.engine.attempts:
            if not attempt.called:
                attempt.callback(None)
        self.successResultOf(stopped)

    def end(self, count: int) -> None:
        """End ``count`` more attempts, then let the loop look (wakeDelay and a turn)."""
        ended = [attempt for attempt in self.engine.attempts if not attempt.called][:count]
        for attempt in ended:
            attempt.callback(None)
        self.clock.advance(self.settings.wakeDelay)
        self.clock.advance(0)

    def test_throughABacklogHalfABatchAtATime(self) -> None:
        enqueue(self.store, self.clock, 60)
        self.clock.advance(0)
        self.assertEqual(self.asked, [12, 8])  # up to the concurrency
        self.end(5)
        self.assertEqual(self.asked, [12, 8])  # five free: less than half a batch
        self.end(1)
        self.assertEqual(self.asked, [12, 8, 6])
        self.assertEqual(self.service.inFlight, 20)

    def test_caughtUpAFreeSlotIsFilledAtOnce(self) -> None:
        enqueue(self.store, self.clock, 19)
        self.clock.advance(0)
        self.assertEqual(self.asked, [12, 8])  # got 7 of 8: caught up, one slot free
        enqueue(self.store, self.clock, 1)
        self.service.wake()
        self.clock.advance(self.settings.wakeDelay)
        self.assertEqual(self.asked, [12, 8, 1])
        self.assertEqual(self.service.inFlight, 20)

    def test_aBacklogThatEndsIsCaughtUpWith(self) -> None:
        """A claim that comes back short ends the backlog: then one free slot is enough."""
        enqueue(self.store, self.clock, 26)
        self.clock.advance(0)
        self.assertEqual(self.asked, [12, 8])
        self.end(6)
        self.assertEqual(self.asked, [12, 8, 6])  # took all 6: the backlog may go on
        self.end(6)
        self.assertEqual(self.asked, [12, 8, 6, 6])  # got none: caught up
        enqueue(self.store, self.clock, 1)
        self.service.wake()
        self.clock.advance(self.settings.wakeDelay)
        self.assertEqual(self.asked, [12, 8, 6, 6, 6])
        self.assertEqual(self.service.inFlight, 15)
