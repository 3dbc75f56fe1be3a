"""
The delivery loop as a Twisted service of the relay's tree: take due work, hand each claimed
notification to the :class:`~mailrelay.delivery.engine.DeliveryEngine`, keep its lease alive
while the attempt runs, and on stop let attempts in flight finish within a deadline, then give
back the leases of the rest.

Every relay process runs one (the main process and each of the ``workers``): with the SQLite
store each delivers what it accepted, from its own file; processes and relays sharing a Redis
store each claim their own share, the store's leases making sure no two hold the same
notification.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from mailrelay.delivery import stats
from mailrelay.delivery.engine import DeliveryEngine
from mailrelay.delivery.inflow import InFlow
from mailrelay.interfaces import IStore, LeaseLost, StoreError
from mailrelay.model import Delivery

if TYPE_CHECKING:
    from mailrelay.delivery.sms.build import SmsParts

log = Logger()

MAX_DESTINATION_LABELS = 20
POOL_CLOSE_WAIT = 2.0
START_SLICE = 4
"""Claimed notifications whose attempts start in one turn of the reactor. Starting one costs
the better part of a millisecond (routing, the message's header, the first commands); a claim
of 50 started at once held up every connection and status request of the process for tens
of milliseconds."""


@dataclass(frozen=True)
class LoopSettings:
    leaseSeconds: float = 300.0
    concurrency: int = 200  # notifications being delivered at once
    batch: int = 50  # claimed per store call at most
    pollInterval: float = 0.5  # seconds between looks at the queue when it had nothing due
    wakeDelay: float = 0.01  # seconds from a message's acceptance to the look that claims it
    stopDeadline: float = 10.0  # seconds attempts in flight may take to finish at stop


class DeliveryService(Service):
    """Claims due notifications and delivers them; see the module's docstring."""

    name = "delivery"

    def __init__(
        self,
        store: IStore,
        engine: DeliveryEngine,
        clock: IReactorTime,
        settings: LoopSettings = LoopSettings(),
        closePool: Callable[[], Deferred[None]] | None = None,
        whenReady: Callable[[], Deferred[None]] | None = None,
        connections: Callable[[], dict[str, int]] | None = None,
        inFlow: InFlow | None = None,
    ) -> None:
        self.connections = connections or dict
        self.inFlow = inFlow  # the intake's flow control: tokens given back as work is claimed
        self.sms: SmsParts | None = None  # the SMS channel's parts, set by makeDelivery
        self._store = store
        self._engine = engine
        self._clock = clock
        self._settings = settings
        self._closePool = closePool
        self._whenReady = whenReady
        self._inFlight: dict[str, tuple[Delivery, Deferred[None]]] = {}
        self._claimed: deque[Delivery] = deque()  # claimed, to start (START_SLICE a turn)
        self._starting: IDelayedCall | None = None
        self._claiming: Deferred[None] | None = None
        self._next: IDelayedCall | None = None
        self._polling = False
        self._storeDown = False
        self._backlog = False  # the last claim took all it asked for: more is due
        # One timer renews every lease in flight, not one per attempt: when a backlog drains,
        # attempts start and end thousands of times a second, each lasting milliseconds.
        self._renewal = LoopingCall(self._renewAll)
        self._renewal.clock = clock
        self.lastPoll: float | None = None  # when the queue was last read successfully

    @property
    def healthy(self) -> bool:
        """Running, and the last look at the queue worked."""
        return bool(self.running) and not self._storeDown

    @property
    def inFlight(self) -> int:
        """Notifications being delivered now, or claimed and about to be."""
        return len(self._inFlight) + len(self._claimed)

    def startService(self) -> None:
        super().startService()
        self._renewal.start(self._settings.leaseSeconds / 3, now=False)
        if self._whenReady is None:
            self._schedule(0)
        else:
            # The store opens after the services start: the first look waits for it.
            self._whenReady().addCallback(self._storeReady)

    def _storeReady(self, _: object) -> None:
        if self.running:
            self._schedule(0)

    def wake(self) -> None:
        """New work may be due (a message was just accepted): look within ``wakeDelay``, not
        at the next poll. The delay lets one claim take the messages accepted meanwhile."""
        self._lookWithin(self._settings.wakeDelay)

    def _lookWithin(self, delay: float) -> None:
        if not self.running or self._polling or self._next is None:
            return
        if self._next.getTime() > self._clock.seconds() + delay:
            self._schedule(delay)

    def _schedule(self, delay: float) -> None:
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = self._clock.callLater(delay, self._poll)

    def _poll(self) -> None:
        self._next = None
        if not self.running:
            return
        self._polling = True
        claiming = Deferred.fromCoroutine(self._claim()).addBoth(self._polled)
        self._claiming = None if claiming.called else claiming

    def _polled(self, more: Any) -> None:
        self._polling = False
        self._claiming = None
        if self.running:
            self._schedule(0 if more is True else self._settings.pollInterval)

    @property
    def _claimFrom(self) -> int:
        """Free slots the next claim waits for. Through a backlog, half a batch: each claim
        is a commit, and one that goes before every few attempts that end would hold up
        their outcomes' writes. Otherwise one: what is due goes out at once."""
        if not self._backlog:
            return 1
        return max(1, min(self._settings.batch, self._settings.concurrency) // 2)

    async def _claim(self) -> bool:
        """Claim what fits; True if there may be more due right away."""
        free = self._settings.concurrency - self.inFlight
        if free < self._claimFrom:
            return False
        wanted = min(free, self._settings.batch)
        started = time.perf_counter()
        try:
            claimed = await self._store.claimDue(
                wanted, self._settings.leaseSeconds, self._engine.start
            )
        except Exception as e:
            if not self._storeDown:
                log.error("delivery: cannot read the queue: {error}", error=str(e))
            self._storeDown = True
            return False
        stats.claimSeconds.observe(time.perf_counter() - started)
        if self._storeDown:
            log.info("delivery: the queue can be read again")
        self._storeDown = False
        self.lastPoll = self._clock.seconds()
        self._claimed.extend(claimed)
        if self._starting is None:
            self._startSome()
        caughtUp = len(claimed) < wanted
        self._backlog = not caughtUp
        if self.inFlow is not None:
            if caughtUp:
                self.inFlow.refill()
            else:
                self.inFlow.give(len(claimed))
        return not caughtUp

    def _startSome(self) -> None:
        """Start the attempts of the first START_SLICE claimed notifications; the rest in
        the next turns, so that the reactor serves what else is waiting in between."""
        self._starting = None
        if not self.running:
            return  # stopping: their leases are given back
        for _ in range(min(START_SLICE, len(self._claimed))):
            self._start(self._claimed.popleft())
        if self._claimed:
            self._starting = self._clock.callLater(0, self._startSome)

    def _start(self, delivery: Delivery) -> None:
        nid = delivery.notification.notification_id
        d = self._engine.deliver(delivery)
        self._inFlight[nid] = (delivery, d)
        stats.inFlight.set(self.inFlight)

        def done(result: Any) -> None:
            self._inFlight.pop(nid, None)
            stats.inFlight.set(self.inFlight)
            if isinstance(result, Exception) or hasattr(result, "value"):
                error = getattr(result, "value", result)
                if isinstance(error, LeaseLost):
                    log.warn("delivery {id}: lease lost, outcome not recorded", id=nid)
                else:
                    log.error("delivery {id} not recorded: {error}", id=nid, error=str(error))
            if self.running and self._settings.concurrency - self.inFlight == self._claimFrom:
                # Through a backlog, claim at once: the claim waited for these slots already.
                self._lookWithin(0 if self._backlog else self._settings.wakeDelay)

        d.addBoth(done)

    def _renewAll(self) -> None:
        """Renew the lease of every notification claimed: each is renewed within
        ``leaseSeconds / 3`` of its claim and every such period after, however long its
        attempt takes."""
        for delivery in [*self._claimed, *(delivery for delivery, _ in self._inFlight.values())]:
            self._renew(delivery)

    def _renew(self, delivery: Delivery) -> Deferred[None]:
        d = self._store.renewLease(
            delivery.notification.notification_id, delivery.lease, self._settings.leaseSeconds
        )

        def failed(failure: Any) -> None:
            if not failure.check(LeaseLost, StoreError):
                log.failure("lease renewal", failure)

        return d.addErrback(failed)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._renewal.running:
            self._renewal.stop()
        if self.inFlow is not None:
            self.inFlow.open()
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        if self._starting is not None and self._starting.active():
            self._starting.cancel()
        self._starting = None
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        running = [d for _, d in self._inFlight.values()]
        if self._claiming is not None:
            running.append(self._claiming)  # what it claims does not start: given back below
        if self._inFlight:
            log.info("delivery: waiting for {count} attempts in flight", count=len(self._inFlight))
        if running:
            # Not addTimeout: cancelling the attempts would make them look finished, and
            # their leases must be given back instead.
            finished: Deferred[Any] = DeferredList(running, consumeErrors=True)
            deadline: Deferred[Any] = deferLater(
                self._clock, self._settings.stopDeadline, lambda: None
            )
            await DeferredList([finished, deadline], fireOnOneCallback=True, consumeErrors=True)
            deadline.cancel()
        unstarted = [(d.notification.notification_id, d) for d in self._claimed]
        self._claimed.clear()
        stopped = [(nid, delivery) for nid, (delivery, _) in self._inFlight.items()]
        for nid, delivery in unstarted + stopped:
            try:
                await self._store.releaseLease(nid, delivery.lease)
            except Exception as e:
                log.warn("delivery {id}: lease not released: {error}", id=nid, error=str(e))
        if self._closePool is not None:
            # Attempts past the deadline have no lease any more; their connections are not
            # worth waiting for beyond a moment (what they record now fails with LeaseLost).
            closed = self._closePool()
            pause: Deferred[Any] = deferLater(self._clock, POOL_CLOSE_WAIT, lambda: None)
            await DeferredList([closed, pause], fireOnOneCallback=True, consumeErrors=True)
            pause.cancel()


async def oldestDueAge(store: IStore, now: float) -> float:
    """Seconds the longest-waiting due entry (queued or deferred) has been due; 0 if none.
    Two indexed reads of one entry each, whatever the size of the queue."""
    oldest = 0.0
    for state in ("queued", "deferred"):
        for item in await store.queueItems(state, None, 1):
            oldest = max(oldest, now - item.next_attempt.timestamp())
    return oldest


class DeliveryProbe:
    """What ``/healthz`` and ``/metrics`` say about delivery: the mode, whether this process's
    loop (``current()``, which a reload may replace) runs, the attempts and connections open,
    how long due work has waited."""

    def __init__(
        self,
        mode: str,
        store: IStore,
        clock: IReactorTime,
        current: Callable[[], DeliveryService | None],
    ) -> None:
        self.mode = mode
        self._store = store
        self._clock = clock
        self._current = current

    @property
    def healthy(self) -> bool:
        """Hold mode is healthy by definition; otherwise the loop must run and read."""
        service = self._current()
        return service is None or service.healthy

    def document(self) -> dict[str, Any]:
        service = self._current()
        return {
            "mode": self.mode,
            "running": service is not None and service.healthy,
            "in_flight": 0 if service is None else service.inFlight,
        }

    async def updateMetrics(self) -> None:
        """Set the delivery gauges for a scrape."""
        stats.oldestDue.set(await oldestDueAge(self._store, self._clock.seconds()))
        service = self._current()
        publishConnections({} if service is None else service.connections())


def publishConnections(connections: dict[str, int]) -> None:
    """Set this process's gauge of open connections by destination: the busiest destinations
    only, as in mx mode every recipient domain is one, and a label per domain would grow the
    exposition without bound."""
    stats.connectionsOpen.clear()
    busiest = sorted(connections.items(), key=lambda item: -item[1])
    for destination, count in busiest[:MAX_DESTINATION_LABELS]:
        stats.connectionsOpen.labels(destination).set(count)
