"""
The pool of outbound SMTP connections: which host to try, how many connections, and reuse.

:meth:`SMTPClientPool.deliver` is one delivery of one message to one destination, as named
steps: check the addresses, wait for a connection slot, take an idle connection (RSET) or
connect to the candidates in order, send the recipients in transactions of at most
``maxRecipientsPerTransaction``, and give every recipient exactly one outcome. The connection
then waits idle for the next delivery to the same destination.

A slot is one connection, counted from the moment a delivery takes it (while it connects, or
tries one candidate after another) until the connection is closed; idle connections keep their
slots, and give them up when a delivery elsewhere needs one.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from mailrelay.delivery.route import Candidate, Credentials, TLSPolicy
from mailrelay.delivery.smtp.client import (
    Envelope,
    EnvelopeRefused,
    HostFailure,
    RecipientOutcome,
    SMTPSession,
    Timeouts,
    TLSCreator,
    isSafeAddress,
    loadTLSCreator,
    openSession,
)

__all__ = ["Envelope", "RecipientOutcome", "SMTPClientPool", "Timeouts"]

log = Logger()

REUSE_RSET_TIMEOUT = 20.0
"""Seconds to wait for the reply to the RSET that starts the reuse of an idle connection
(Postfix's ``smtp_rset_timeout``); no reply: a new connection is made."""
CHECK_AFTER_IDLE = 1.0
"""Seconds a connection whose last transaction ended in order may idle and be reused without
an RSET first: the server awaits a new transaction (RFC 5321, 4.1.4), and a connection that
died since is found out by the next command, whose failure sends the message down a new
connection. Checking every reuse cost a round trip and most of a tenth of the CPU a message
when the connections to a smarthost pass from one message to the next."""

_Key = tuple[TLSPolicy, Credentials | None]
"""What a reused connection must have been opened with, besides its destination."""


class _Stopped(Exception):
    """The pool is closing: no new connection or transaction starts."""


@dataclass(eq=False)
class _Slot:
    """One connection's place in the limits, held by one delivery (``session``: the connection
    it is using now, if any)."""

    destination: str
    key: _Key
    session: SMTPSession | None = None
    checked: bool = False  # the session need not be checked before its next transaction
    inOrder: bool = False  # its last transaction ended in order: no transaction is open


@dataclass(eq=False)
class _Idle:
    destination: str
    key: _Key
    session: SMTPSession
    since: float  # when it went idle
    inOrderAt: float | None = None  # when its last transaction ended in order


@dataclass(eq=False)
class _Waiter:
    destination: str
    key: _Key
    ready: Deferred[_Slot] = field(default_factory=Deferred)
    order: int = 0  # when it started waiting, among all waiters: oldest first


def _local(recipient: str, reason: str, dsnCode: str, kind: Any = "deferred") -> RecipientOutcome:
    """An outcome no remote host gave."""
    return RecipientOutcome(recipient, kind, reason, "", dsnCode, 0)


class SMTPClientPool:
    """
    Delivers messages over a bounded, reused set of SMTP connections.

    At most ``maxConnections`` connections are open (or opening) at once, and at most
    ``maxPerDestination`` to one destination; a delivery beyond them waits its turn (first
    come, first served among those a freed slot can serve). A connection stays open
    ``idleTimeout`` seconds after its delivery for the next one to the same destination.
    """

    def __init__(
        self,
        reactor: Any,
        heloName: str,
        timeouts: Timeouts = Timeouts(),  # noqa: B008 (frozen, so sharing it is safe)
        maxConnections: int = 100,
        maxPerDestination: int = 20,
        maxRecipientsPerTransaction: int = 50,
        idleTimeout: float = 5.0,
        checkAfterIdle: float = CHECK_AFTER_IDLE,
    ) -> None:
        if min(maxConnections, maxPerDestination, maxRecipientsPerTransaction) < 1:
            raise ValueError("connection and recipient limits must be at least 1")
        self._reactor = reactor
        self.heloName = heloName
        self.timeouts = timeouts
        self.maxConnections = maxConnections
        self.maxPerDestination = maxPerDestination
        self.maxRecipientsPerTransaction = maxRecipientsPerTransaction
        self.idleTimeout = idleTimeout
        self.checkAfterIdle = checkAfterIdle
        self._open: dict[str, int] = {}
        self._total = 0
        self._idle: list[_Idle] = []  # oldest first
        # One timer, for the oldest idle connection, not one per connection: each is idle
        # for a moment between deliveries when a backlog drains, thousands of times a second.
        self._idleTimer: IDelayedCall | None = None
        # Waiters by what they wait for, each queue oldest first: a free slot is offered to
        # the oldest waiter that can take it by looking at the head of each queue, not at
        # every waiter (hundreds of them wait for one smarthost's few connections).
        self._waiting: dict[tuple[str, _Key], deque[_Waiter]] = {}
        self._arrivals = itertools.count()
        self._waking = False
        self._deliveries: set[Deferred[list[RecipientOutcome]]] = set()
        self._closingConnections: set[Deferred[None]] = set()
        self._tlsCreators: dict[TLSPolicy, TLSCreator] = {}
        self._closing = False

    # -- the public face

    def deliver(
        self,
        destination: str,
        candidates: Sequence[Candidate],
        tls: TLSPolicy,
        envelope: Envelope,
        credentials: Credentials | None = None,
    ) -> Deferred[list[RecipientOutcome]]:
        """
        Deliver ``envelope`` to ``destination`` through the first of ``candidates`` that
        takes it. Never fails: fires with one outcome per entry of ``envelope.recipients``,
        in order.
        """
        delivery = Deferred.fromCoroutine(
            self._deliver(destination, tuple(candidates), tls, envelope, credentials)
        )
        if not delivery.called:
            self._deliveries.add(delivery)
            delivery.addBoth(self._delivered, delivery)
        return delivery

    def openConnections(self) -> dict[str, int]:
        """Destination -> connections open (or opening) now, idle ones included."""
        return {destination: count for destination, count in self._open.items() if count}

    def close(self) -> Deferred[None]:
        """
        Stop: deliveries waiting for a slot and deliveries made from now on get their
        recipients deferred, idle connections close (QUIT), busy ones finish the transaction
        they are in and then close. Fires when every connection is closed.
        """
        return Deferred.fromCoroutine(self._close())

    # -- one delivery

    async def _deliver(
        self,
        destination: str,
        candidates: tuple[Candidate, ...],
        tls: TLSPolicy,
        envelope: Envelope,
        credentials: Credentials | None,
    ) -> list[RecipientOutcome]:
        outcomes: dict[str, RecipientOutcome] = {}
        try:
            await self._deliverChecked(
                destination, candidates, tls, envelope, credentials, outcomes
            )
        except CancelledError:
            raise  # the caller gave up on this delivery
        except Exception:
            # A bug here must not lose recipients: whatever has no outcome is retried later.
            log.failure("delivery to {destination} failed", destination=destination)
        return [
            outcomes.get(recipient) or _local(recipient, "internal error", "4.3.0")
            for recipient in envelope.recipients
        ]

    async def _deliverChecked(
        self,
        destination: str,
        candidates: tuple[Candidate, ...],
        tls: TLSPolicy,
        envelope: Envelope,
        credentials: Credentials | None,
        outcomes: dict[str, RecipientOutcome],
    ) -> None:
        recipients = list(dict.fromkeys(envelope.recipients))  # each address once
        if not isSafeAddress(envelope.sender):
            for recipient in recipients:
                outcomes[recipient] = _local(
                    recipient, "bad sender address syntax", "5.1.7", "failed"
                )
            return
        for recipient in recipients:
            if not isSafeAddress(recipient):
                outcomes[recipient] = _local(
                    recipient, "bad recipient address syntax", "5.1.3", "failed"
                )
        pending = [recipient for recipient in recipients if recipient not in outcomes]
        if not pending:
            return
        try:
            slot = await self._acquire(destination, (tls, credentials))
        except _Stopped:
            self._stopped(pending, outcomes)
            return
        try:
            # A connection idle a while may have died without a word: don't wait long on it.
            rsetTimeout = min(self.timeouts.command, REUSE_RSET_TIMEOUT)
            session = None if slot.checked else slot.session
            if session is not None and not await session.reset(rsetTimeout):
                log.debug(
                    "reused connection to {destination} refused RSET", destination=destination
                )
                slot.session = None
            await self._send(slot, candidates, tls, credentials, envelope, pending, outcomes)
        except BaseException:
            # Cancelled, or a bug: the conversation may be out of step, so it is not reused.
            if slot.session is not None:
                slot.session.protocol.abort()
                slot.session = None
            raise
        finally:
            self._release(slot)

    async def _send(
        self,
        slot: _Slot,
        candidates: tuple[Candidate, ...],
        tls: TLSPolicy,
        credentials: Credentials | None,
        envelope: Envelope,
        pending: list[str],
        outcomes: dict[str, RecipientOutcome],
    ) -> None:
        """Send to ``pending`` in transactions, moving to the next candidate on a HostFailure
        (the recipients a host had answered for keep its answer)."""
        lastFailure: HostFailure | None = None
        allPermanent = True
        untried = deque(candidates)
        while pending:
            if slot.session is None:
                if not untried:
                    break
                try:
                    slot.session = await self._connect(untried.popleft(), tls, credentials)
                except HostFailure as failure:
                    log.info("{failure}", failure=str(failure))
                    lastFailure, allPermanent = failure, allPermanent and failure.permanent
                    continue
                except EnvelopeRefused as refused:
                    self._refuse(refused, pending, outcomes)
                    return
            if self._closing:
                self._stopped(pending, outcomes)
                return
            chunk = pending[: self.maxRecipientsPerTransaction]
            slot.inOrder = False
            try:
                results = await slot.session.transact(envelope.sender, chunk, envelope.message)
            except HostFailure as failure:
                log.info("{failure}", failure=str(failure))
                slot.session = None
                lastFailure, allPermanent = failure, allPermanent and failure.permanent
                for outcome in failure.decided:
                    outcomes[outcome.recipient] = outcome
                pending = [recipient for recipient in pending if recipient not in outcomes]
                continue
            except EnvelopeRefused as refused:
                self._refuse(refused, pending, outcomes)
                if not slot.session.usable:
                    slot.session = None
                return
            slot.inOrder = True
            for outcome in results:
                outcomes[outcome.recipient] = outcome
            pending = pending[len(chunk) :]
            if not slot.session.usable:
                slot.session = None
        for recipient in pending:
            if lastFailure is None:
                outcomes[recipient] = _local(recipient, "no host could be reached", "4.4.1")
            else:
                outcomes[recipient] = lastFailure.outcome(recipient, permanent=allPermanent)

    async def _connect(
        self, candidate: Candidate, tls: TLSPolicy, credentials: Credentials | None
    ) -> SMTPSession:
        """A started session with ``candidate``; opportunistic TLS that fails the handshake
        gets one more connection, in clear."""
        creator = self._tlsCreators.get(tls)
        if creator is None:
            creator = self._tlsCreators[tls] = loadTLSCreator(tls, candidate.host)

        def attempt(startTLS: bool) -> Deferred[SMTPSession]:
            return Deferred.fromCoroutine(
                openSession(
                    self._reactor,
                    candidate,
                    self.heloName,
                    tls,
                    self.timeouts,
                    credentials,
                    creator,
                    startTLS=startTLS,
                )
            )

        try:
            return await attempt(True)
        except HostFailure as failure:
            if not (failure.tlsFailure and tls.mode == "opportunistic"):
                raise
            log.info("{failure}; trying again without TLS", failure=str(failure))
        return await attempt(False)

    @staticmethod
    def _refuse(
        refused: EnvelopeRefused, pending: list[str], outcomes: dict[str, RecipientOutcome]
    ) -> None:
        for recipient in pending:
            outcomes[recipient] = refused.outcome(recipient)

    @staticmethod
    def _stopped(pending: list[str], outcomes: dict[str, RecipientOutcome]) -> None:
        for recipient in pending:
            outcomes.setdefault(recipient, _local(recipient, "delivery stopped", "4.3.2"))

    def _delivered(
        self, result: list[RecipientOutcome], delivery: Deferred[list[RecipientOutcome]]
    ) -> list[RecipientOutcome]:
        self._deliveries.discard(delivery)
        return result

    # -- slots

    def _acquire(self, destination: str, key: _Key) -> Deferred[_Slot]:
        """A slot for ``destination`` (with an idle connection opened with ``key``, if there
        is one), now or when one is free; fails with _Stopped when the pool closes."""
        if self._closing:
            return Deferred.fromCoroutine(self._raiseStopped())
        waiter = _Waiter(destination, key, order=next(self._arrivals))
        waiter.ready = Deferred(lambda _: self._cancelWaiting(waiter))
        self._waiting.setdefault((destination, key), deque()).append(waiter)
        self._wake()
        return waiter.ready

    def _cancelWaiting(self, waiter: _Waiter) -> None:
        wanted = (waiter.destination, waiter.key)
        queue = self._waiting.get(wanted)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._waiting[wanted]

    @staticmethod
    async def _raiseStopped() -> _Slot:
        raise _Stopped()

    def _canStart(self, destination: str, key: _Key) -> bool:
        if self._findIdle(destination, key) is not None:
            return True
        perDestination = self._open.get(destination, 0) < self.maxPerDestination or any(
            idle.destination == destination for idle in self._idle
        )
        total = self._total < self.maxConnections or bool(self._idle)
        return perDestination and total

    def _take(self, destination: str, key: _Key) -> _Slot:
        idle = self._findIdle(destination, key)
        if idle is not None:
            self._idle.remove(idle)
            idle.session.protocol.onLost = None
            idleFor = None if idle.inOrderAt is None else self._reactor.seconds() - idle.inOrderAt
            checked = idleFor is not None and idleFor < self.checkAfterIdle
            return _Slot(destination, key, idle.session, checked=checked)
        if self._open.get(destination, 0) >= self.maxPerDestination:
            # Only idle connections opened otherwise (TLS policy, credentials) are in the way.
            self._dropIdle(next(i for i in self._idle if i.destination == destination))
        if self._total >= self.maxConnections:
            self._dropIdle(self._idle[0])
        self._open[destination] = self._open.get(destination, 0) + 1
        self._total += 1
        return _Slot(destination, key)

    def _findIdle(self, destination: str, key: _Key) -> _Idle | None:
        for idle in reversed(self._idle):  # the most recently used first: likelier still open
            if idle.destination == destination and idle.key == key:
                return idle
        return None

    def _wake(self) -> None:
        """Give free slots to waiting deliveries, oldest first."""
        if self._waking:
            return
        self._waking = True
        try:
            while True:
                waiter = self._firstStartable()
                if waiter is None:
                    return
                wanted = (waiter.destination, waiter.key)
                queue = self._waiting[wanted]
                queue.popleft()
                if not queue:
                    del self._waiting[wanted]
                waiter.ready.callback(self._take(waiter.destination, waiter.key))
        finally:
            self._waking = False

    def _firstStartable(self) -> _Waiter | None:
        """The oldest waiter that can start now: waiters for one destination and key share
        the answer, so only the head of each one's queue is a candidate."""
        first: _Waiter | None = None
        for (destination, key), queue in self._waiting.items():
            head = queue[0]
            if (first is None or head.order < first.order) and self._canStart(destination, key):
                first = head
        return first

    def _release(self, slot: _Slot) -> None:
        """Give back a delivery's slot: its connection idles, or closes (and frees it)."""
        session, slot.session = slot.session, None
        if session is not None and session.usable and not self._closing and self.idleTimeout > 0:
            now = self._reactor.seconds()
            idle = _Idle(slot.destination, slot.key, session, since=now)
            if slot.inOrder:
                idle.inOrderAt = now
            session.protocol.onLost = lambda: self._idleLost(idle)
            self._idle.append(idle)
            self._timeIdle()
        else:
            if session is not None:
                self._closeSession(session)
            self._free(slot.destination)
        self._wake()

    def _free(self, destination: str) -> None:
        self._open[destination] -= 1
        self._total -= 1
        if not self._open[destination]:
            del self._open[destination]

    def _dropIdle(self, idle: _Idle) -> None:
        """Close an idle connection (its idle time is over, or its slot is wanted)."""
        if idle not in self._idle:
            return
        self._idle.remove(idle)
        idle.session.protocol.onLost = None
        self._closeSession(idle.session)
        self._free(idle.destination)
        self._wake()

    def _timeIdle(self) -> None:
        """Have the timer run when the oldest idle connection's idle time is over."""
        if self._idle and (self._idleTimer is None or not self._idleTimer.active()):
            delay = self._idle[0].since + self.idleTimeout - self._reactor.seconds()
            self._idleTimer = self._reactor.callLater(max(delay, 0.0), self._idleTimeUp)

    def _idleTimeUp(self) -> None:
        """Close the connections idle for ``idleTimeout`` (the oldest, maybe taken since,
        is what the timer was for); time the oldest left."""
        self._idleTimer = None
        over = self._reactor.seconds() - self.idleTimeout
        while self._idle and self._idle[0].since <= over:
            self._dropIdle(self._idle[0])
        self._timeIdle()

    def _idleLost(self, idle: _Idle) -> None:
        """The server closed an idle connection."""
        self._dropIdle(idle)

    def _closeSession(self, session: SMTPSession) -> None:
        closing = session.quit()
        if not closing.called:
            self._closingConnections.add(closing)
            closing.addBoth(lambda _: self._closingConnections.discard(closing))

    # -- stopping

    async def _close(self) -> None:
        self._closing = True
        waiting, self._waiting = self._waiting, {}
        for waiter in sorted((w for q in waiting.values() for w in q), key=lambda w: w.order):
            waiter.ready.errback(_Stopped())
        for idle in list(self._idle):
            self._dropIdle(idle)
        if self._idleTimer is not None and self._idleTimer.active():
            self._idleTimer.cancel()
        while self._deliveries:
            await DeferredList(list(self._deliveries))
        while self._closingConnections:
            await DeferredList(list(self._closingConnections))
