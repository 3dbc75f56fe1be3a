"""
Fakes for testing code that uses mailrelay, shipped with the package (as ``treq.testing`` is
with treq) so that callers test without a database, threads or the network.

- :class:`MemoryStore`: every store interface (:class:`~mailrelay.interfaces.IStore`) in
  memory. Each method answers with a Deferred that has already fired; time comes from an
  injected clock. It passes the same test suite as the SQLite and Redis backends
  (``tests/store_mixin.py``, run by ``tests/test_testing.py``).
- :class:`FakeSubmission` and :func:`fakePortal`: an SMTP avatar that accepts everything and
  keeps what it is given, behind a portal with in-memory passwords.
- :class:`SynchronousReactor`, :class:`SynchronousThreadPool`, :func:`cheapPasswordHash`: what
  the real portal (``mailrelay.auth.realm.makePortal``) needs to run without threads and
  without Argon2's deliberate slowness.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import wraps
from typing import Any, Concatenate, ParamSpec, TypeVar

from argon2 import PasswordHasher
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.ids import NotificationIdGenerator
from mailrelay.interfaces import (
    AlreadyExists,
    InsufficientCredits,
    IStore,
    ISubmission,
    LeaseLost,
    NotFound,
    StoreError,
)
from mailrelay.model import (
    STATUS_TEXTS,
    Account,
    ApiKey,
    ClaimedReport,
    Delivery,
    DkimKey,
    FirstAttempt,
    MessageText,
    Notification,
    PendingReport,
    QueueItem,
    QueueState,
    QueueStats,
    Recipient,
    ReportAttempt,
    Sender,
    SessionInfo,
    StatusEvent,
    fromTimestamp,
    joinText,
)
from mailrelay.store.common import fairShare, idNumber

__all__ = [
    "FakeSubmission",
    "MemoryStore",
    "SynchronousReactor",
    "SynchronousThreadPool",
    "cheapPasswordHash",
    "fakePortal",
]

_P = ParamSpec("_P")
_T = TypeVar("_T")
_Self = TypeVar("_Self", bound="MemoryStore")


def _answered(
    method: Callable[Concatenate[_Self, _P], _T],
) -> Callable[Concatenate[_Self, _P], Deferred[_T]]:
    """Makes a method that computes its answer into one that returns it as a fired Deferred
    (or a failed one, with what it raised); a closed store fails with StoreError."""

    @wraps(method)
    def answer(self: _Self, *args: _P.args, **kwargs: _P.kwargs) -> Deferred[_T]:
        if self.closed:
            return fail(StoreError("the store is closed"))
        try:
            return succeed(method(self, *args, **kwargs))
        except Exception:
            return fail(Failure())

    return answer


@dataclass
class _Entry:
    """A notification in the queue: its message and where its delivery stands."""

    message: bytes
    state: QueueState
    nextAttempt: datetime  # in flight: when the lease ends
    pending: tuple[Recipient, ...]
    attempts: int = 0
    lease: str | None = None
    holdWhenBack: bool = False  # held while in flight: held once its claim comes back


@dataclass
class _Report:
    """A report in the outbox."""

    report: PendingReport
    due: datetime
    attempts: int = 0
    lease: str | None = None
    leaseUntil: datetime | None = None


@dataclass
class _Text:
    """The SMS gateway ids of one text not yet settled."""

    notificationId: str
    recipient: Recipient
    until: datetime
    ids: set[str] = field(default_factory=set)


@implementer(IStore)
class MemoryStore:
    """
    Everything a store keeps, in dicts and lists of this process: a store for tests, not for
    a relay (nothing survives the process, and nothing is shared with another one).

    It behaves as the backends do where ``tests/store_mixin.py`` says how, with these
    differences: values are kept as given (no rounding of times to milliseconds); account
    data is never remembered, so every read sees the latest write; a closed store fails
    every call with StoreError. ``clock`` (default: the global reactor) tells the time for
    due work, leases, API keys and notification ids.

    :meth:`holdEnqueues` makes enqueues wait, as a busy database would, until
    :meth:`releaseEnqueues`.
    """

    name = "memory"

    def __init__(self, clock: IReactorTime | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.clock: IReactorTime = clock
        self.closed = False
        self._newId = NotificationIdGenerator(0, clock.seconds)
        self._accounts: dict[str, Account] = {}
        self._apiKeys: dict[str, tuple[ApiKey, bool]] = {}  # key hash -> (key, revoked)
        self._senders: dict[tuple[str, str], Sender] = {}
        self._notifications: dict[str, Notification] = {}
        self._events: dict[str, list[StatusEvent]] = {}
        self._queue: dict[str, _Entry] = {}
        self._dkimKeys: dict[str, DkimKey] = {}
        self._reports: dict[str, _Report] = {}
        self._reportAttempts: dict[str, list[ReportAttempt]] = {}
        self._gone: set[str] = set()
        self._webhookSecrets: dict[str, tuple[str, ...]] = {}
        self._sharedKeys: dict[str, bytes] = {}
        self._gatewayIds: dict[str, _Text] = {}
        self._heldEnqueues: list[Callable[[], None]] | None = None

    def __repr__(self) -> str:
        return f"<MemoryStore {len(self._notifications)} notifications>"

    def _now(self) -> datetime:
        return fromTimestamp(self.clock.seconds())

    # -- IStore --

    def open(self) -> Deferred[None]:
        self.closed = False
        return succeed(None)

    def close(self) -> Deferred[None]:
        """Closes the store: every later call fails with StoreError (until :meth:`open`)."""
        self.closed = True
        return succeed(None)

    @_answered
    def ping(self) -> float:
        return 0.0

    # -- IAccountStore --

    @_answered
    def addAccount(self, name: str, passwordHash: str) -> Account:
        if name in self._accounts:
            raise AlreadyExists(f"account exists already: {name}")
        account = Account(name=name, password_hash=passwordHash)
        self._accounts[name] = account
        return account

    @_answered
    def getAccount(self, name: str) -> Account | None:
        return self._accounts.get(name)

    @_answered
    def listAccounts(self) -> list[Account]:
        return sorted(self._accounts.values(), key=lambda a: a.name)

    @_answered
    def updateAccount(self, account: Account) -> None:
        self._requireAccount(account.name)
        self._accounts[account.name] = account

    def _requireAccount(self, name: str) -> None:
        if name not in self._accounts:
            raise NotFound(f"no such account: {name}")

    @_answered
    def addApiKey(self, account: str, keyId: str, keyHash: str) -> ApiKey:
        self._requireAccount(account)
        taken = any(k.key_id == keyId for k, _ in self._apiKeys.values())
        if keyHash in self._apiKeys or taken:
            raise AlreadyExists(f"API key exists already: {keyId}")
        key = ApiKey(key_id=keyId, account=account, created_at=self._now())
        self._apiKeys[keyHash] = (key, False)
        return key

    @_answered
    def findApiKey(self, keyHash: str) -> ApiKey | None:
        key, revoked = self._apiKeys.get(keyHash, (None, False))
        return None if revoked else key

    @_answered
    def listApiKeys(self, account: str) -> list[ApiKey]:
        # Kept in the order added, which is oldest first.
        return [k for k, revoked in self._apiKeys.values() if k.account == account and not revoked]

    @_answered
    def revokeApiKey(self, account: str, keyId: str) -> bool:
        for keyHash, (key, revoked) in self._apiKeys.items():
            if key.account == account and key.key_id == keyId and not revoked:
                self._apiKeys[keyHash] = (key, True)
                return True
        return False

    @_answered
    def addSender(self, sender: Sender) -> None:
        self._requireAccount(sender.account)
        if (sender.account, sender.value) in self._senders:
            raise AlreadyExists(f"sender exists already: {sender.value}")
        self._senders[sender.account, sender.value] = sender

    @_answered
    def listSenders(self, account: str) -> list[Sender]:
        return sorted((s for s in self._senders.values() if s.account == account), key=_value)

    @_answered
    def removeSender(self, account: str, value: str) -> bool:
        return self._senders.pop((account, value), None) is not None

    # -- IMessageQueue --

    def nextNotificationId(self) -> str:
        return self._newId()

    def enqueue(
        self, notification: Notification, message: MessageText, smsCredits: int = 0
    ) -> Deferred[None]:
        if self._heldEnqueues is None:
            return self._enqueue(notification, message, smsCredits)
        d: Deferred[None] = Deferred()

        def later() -> None:
            self._enqueue(notification, message, smsCredits).chainDeferred(d)

        self._heldEnqueues.append(later)
        return d

    @_answered
    def _enqueue(self, notification: Notification, message: MessageText, smsCredits: int) -> None:
        nid = notification.notification_id
        if nid in self._notifications:
            raise AlreadyExists(f"notification exists already: {nid}")
        if smsCredits > 0:
            account = self._accounts.get(notification.account)
            if account is None or (
                account.sms_credits is not None and account.sms_credits < smsCredits
            ):
                raise InsufficientCredits("the account's SMS credits do not cover the message")
            if account.sms_credits is not None:
                left = account.sms_credits - smsCredits
                self._accounts[account.name] = dataclasses.replace(account, sms_credits=left)
        self._notifications[nid] = notification
        self._events[nid] = [
            StatusEvent(
                nid, r, "CAAS_RECEIVED", STATUS_TEXTS["CAAS_RECEIVED"], notification.received_at
            )
            for r in notification.recipients
        ]
        self._queue[nid] = _Entry(
            message=joinText(message),
            state="queued",
            nextAttempt=notification.received_at,
            pending=notification.recipients,
        )

    def holdEnqueues(self) -> None:
        """Make enqueues wait (their Deferreds unfired, nothing stored) until
        :meth:`releaseEnqueues`: a store that takes its time, as a database whose write lock
        another connection holds."""
        if self._heldEnqueues is None:
            self._heldEnqueues = []

    def releaseEnqueues(self) -> None:
        """Store the enqueues that waited, in the order they came, and fire their Deferreds."""
        held, self._heldEnqueues = self._heldEnqueues or [], None
        for later in held:
            later()

    def hasMessage(self, notificationId: str) -> bool:
        """Whether the store still keeps the message bytes of ``notificationId`` (it drops
        them when the notification leaves the queue)."""
        return notificationId in self._queue

    @_answered
    def acceptedSince(self, account: str, since: datetime) -> int:
        return sum(
            1
            for n in self._notifications.values()
            if n.account == account and n.received_at >= since
        )

    @_answered
    def stats(self) -> QueueStats:
        states = [entry.state for entry in self._queue.values()]
        return QueueStats(
            queued=states.count("queued"),
            deferred=states.count("deferred"),
            in_flight=states.count("in_flight"),
            held=states.count("held"),
        )

    # -- IDeliveryQueue --

    @_answered
    def claimDue(
        self, limit: int, leaseSeconds: float, firstAttempt: FirstAttempt | None = None
    ) -> list[Delivery]:
        if limit <= 0:
            return []
        now = self._now()
        fresh: list[tuple[datetime, int, str]] = []
        retries: list[tuple[datetime, int, str]] = []
        for nid, entry in self._queue.items():
            if entry.state == "held" or entry.nextAttempt > now:
                continue
            if entry.state == "in_flight" and entry.holdWhenBack:
                # A lapsed lease of an entry held meanwhile: held, not handed out again.
                self._giveBack(entry, now)
                continue
            due = (entry.nextAttempt, _number(nid), nid)
            (fresh if entry.state == "queued" else retries).append(due)
        lease = secrets.token_hex(8)
        claimed = []
        for _, _, nid in fairShare(sorted(fresh), sorted(retries), limit):
            entry = self._queue[nid]
            entry.state = "in_flight"
            entry.lease = lease
            entry.nextAttempt = now + timedelta(seconds=leaseSeconds)
            entry.attempts += 1
            delivery = Delivery(
                notification=self._notifications[nid],
                message=entry.message,
                pending=entry.pending,
                attempts=entry.attempts,
                lease=lease,
            )
            if firstAttempt is not None and delivery.attempts == 1:
                events, reports = firstAttempt(delivery)
                self._events[nid].extend(events)
                self._addReports(list(reports))
            claimed.append(delivery)
        return claimed

    def _leased(self, notificationId: str, lease: str) -> _Entry:
        entry = self._queue.get(notificationId)
        if entry is None or entry.state != "in_flight" or entry.lease != lease:
            raise LeaseLost(f"lease lost: {notificationId}")
        return entry

    def _giveBack(self, entry: _Entry, now: datetime) -> None:
        """An entry in flight becomes due again at once: held if it was held meanwhile."""
        entry.lease = None
        entry.nextAttempt = now
        if entry.holdWhenBack:
            entry.state, entry.holdWhenBack = "held", False
        else:
            entry.state = "queued" if entry.attempts == 0 else "deferred"

    @_answered
    def renewLease(self, notificationId: str, lease: str, leaseSeconds: float) -> None:
        entry = self._leased(notificationId, lease)
        entry.nextAttempt = self._now() + timedelta(seconds=leaseSeconds)

    @_answered
    def recordOutcome(
        self,
        notificationId: str,
        lease: str,
        events: Iterable[StatusEvent],
        finished: Iterable[Recipient],
        nextAttempt: datetime | None,
        reports: Iterable[PendingReport] = (),
    ) -> None:
        entry = self._leased(notificationId, lease)
        events, reports = list(events), list(reports)
        others = {e.notification_id for e in events} | {r.notification_id for r in reports}
        if others - {notificationId}:
            raise StoreError(f"events or reports of another notification than {notificationId}")
        self._events[notificationId].extend(events)
        self._addReports(reports)
        done = set(finished)
        entry.pending = tuple(r for r in entry.pending if r not in done)
        if not entry.pending:
            del self._queue[notificationId]
        elif nextAttempt is not None:
            self._giveBack(entry, nextAttempt)

    @_answered
    def releaseLease(self, notificationId: str, lease: str) -> None:
        entry = self._leased(notificationId, lease)
        entry.attempts -= 1
        self._giveBack(entry, self._now())

    @_answered
    def queueItems(
        self, state: QueueState | None, account: str | None, limit: int
    ) -> list[QueueItem]:
        items = [
            self._item(nid)
            for nid, entry in self._queue.items()
            if (state is None or entry.state == state)
            and (account is None or self._notifications[nid].account == account)
        ]
        items.sort(key=lambda i: (i.next_attempt, _number(i.notification_id)))
        return items[:limit]

    @_answered
    def queueItem(self, notificationId: str) -> QueueItem | None:
        return self._item(notificationId) if notificationId in self._queue else None

    def _item(self, notificationId: str) -> QueueItem:
        entry, notification = self._queue[notificationId], self._notifications[notificationId]
        return QueueItem(
            notification_id=notificationId,
            account=notification.account,
            sender=notification.sender,
            state=entry.state,
            next_attempt=entry.nextAttempt,
            attempts=entry.attempts,
            pending=entry.pending,
            received_at=notification.received_at,
            size=notification.size,
        )

    def _selected(self, notificationId: str | None, account: str | None) -> list[_Entry]:
        """The queue entries named: the one ``notificationId``, or every one of ``account``,
        or every one with both None."""
        if notificationId is not None:
            entry = self._queue.get(notificationId)
            return [] if entry is None else [entry]
        return [
            entry
            for nid, entry in self._queue.items()
            if account is None or self._notifications[nid].account == account
        ]

    @_answered
    def retryNow(self, notificationId: str | None) -> int:
        now = self._now()
        count = 0
        for entry in self._selected(notificationId, None):
            if entry.state in ("queued", "deferred"):
                entry.nextAttempt = now
                count += 1
        return count

    @_answered
    def hold(self, notificationId: str | None, account: str | None) -> int:
        held = 0
        for entry in self._selected(notificationId, account):
            if entry.state == "in_flight":
                entry.holdWhenBack = True
            else:
                entry.state = "held"
                held += 1
        return held

    @_answered
    def release(self, notificationId: str | None, account: str | None) -> int:
        now = self._now()
        released = 0
        for entry in self._selected(notificationId, account):
            if entry.state == "held":
                entry.state = "queued" if entry.attempts == 0 else "deferred"
                entry.nextAttempt = now
                released += 1
            entry.holdWhenBack = False
        return released

    @_answered
    def deleteQueued(self, notificationId: str, statusText: str, at: datetime) -> list[Recipient]:
        entry = self._queue.pop(notificationId, None)
        if entry is None:
            raise NotFound(f"not in the queue: {notificationId}")
        self._events[notificationId].extend(
            StatusEvent(notificationId, r, "CAAS_FAILED", statusText, at) for r in entry.pending
        )
        return list(entry.pending)

    # -- IDkimKeyStore --

    @_answered
    def putDkimKey(self, key: DkimKey) -> None:
        self._dkimKeys[key.domain] = key

    @_answered
    def getDkimKey(self, domain: str) -> DkimKey | None:
        return self._dkimKeys.get(domain)

    @_answered
    def listDkimKeys(self) -> list[DkimKey]:
        return [self._dkimKeys[domain] for domain in sorted(self._dkimKeys)]

    @_answered
    def removeDkimKey(self, domain: str) -> bool:
        return self._dkimKeys.pop(domain, None) is not None

    # -- IStatusStore --

    @_answered
    def getNotification(self, notificationId: str) -> Notification | None:
        return self._notifications.get(notificationId)

    @_answered
    def addEvents(self, events: Iterable[StatusEvent]) -> None:
        self._addEvents(list(events))

    def _addEvents(self, events: Sequence[StatusEvent]) -> None:
        for event in events:
            if event.notification_id not in self._notifications:
                raise NotFound(f"no such notification: {event.notification_id}")
        for event in events:
            self._events[event.notification_id].append(event)

    @_answered
    def statusTrail(self, notificationId: str) -> list[StatusEvent]:
        return self._trail(notificationId)

    def _trail(self, notificationId: str) -> list[StatusEvent]:
        # Oldest first; events of the same moment in the order they were written.
        return sorted(self._events.get(notificationId, ()), key=lambda e: e.timestamp)

    @_answered
    def notificationWithTrail(
        self, notificationId: str
    ) -> tuple[Notification | None, list[StatusEvent]]:
        return self._notifications.get(notificationId), self._trail(notificationId)

    @_answered
    def notificationsForBulk(self, account: str, bulkId: str) -> list[str]:
        found = [
            n
            for n in self._notifications.values()
            if n.account == account and n.options.bulk_id == bulkId
        ]
        found.sort(key=lambda n: (n.received_at, _number(n.notification_id)))
        return [n.notification_id for n in found]

    @_answered
    def expire(self, before: datetime) -> int:
        gone = [
            nid
            for nid, n in self._notifications.items()
            if n.received_at < before and nid not in self._queue
        ]
        for nid in gone:
            del self._notifications[nid], self._events[nid]
            self._reportAttempts.pop(nid, None)
        forgotten = set(gone)
        for reportId, entry in list(self._reports.items()):
            if entry.report.notification_id in forgotten:
                del self._reports[reportId]
        now = self._now()
        for gatewayId, text in list(self._gatewayIds.items()):
            if text.notificationId in forgotten or text.until < now:
                del self._gatewayIds[gatewayId]
        return len(gone)

    # -- IReportQueue --

    def _addReports(self, reports: Iterable[PendingReport]) -> None:
        now = self._now()
        for report in reports:
            self._reports[report.report_id] = _Report(report, due=now)

    @_answered
    def addEventsWithReports(
        self, events: Iterable[StatusEvent], reports: Iterable[PendingReport]
    ) -> None:
        events, reports = list(events), list(reports)
        ids = {e.notification_id for e in events} | {r.notification_id for r in reports}
        if len(ids) > 1:
            raise StoreError("events and reports of more than one notification")
        for nid in ids:
            if nid not in self._notifications:
                raise NotFound(f"no such notification: {nid}")
        self._addEvents(events)
        self._addReports(reports)

    @_answered
    def claimReports(self, limit: int, leaseSeconds: float) -> list[ClaimedReport]:
        now = self._now()
        due = [
            entry
            for entry in self._reports.values()
            if entry.due <= now and (entry.leaseUntil is None or entry.leaseUntil <= now)
        ]
        due.sort(key=lambda entry: (entry.due, entry.report.created_at))
        lease = secrets.token_hex(8)
        claimed = []
        for entry in due[: max(limit, 0)]:
            entry.lease, entry.leaseUntil = lease, now + timedelta(seconds=leaseSeconds)
            claimed.append(ClaimedReport(entry.report, entry.attempts, lease))
        return claimed

    @_answered
    def recordReportAttempt(
        self,
        claims: Iterable[tuple[str, str]],
        attempt: ReportAttempt | None,
        nextAttempt: datetime | None,
    ) -> int:
        written = 0
        for reportId, lease in claims:
            entry = self._reports.get(reportId)
            if entry is None or entry.lease is None or entry.lease != lease:
                continue
            written += 1
            entry.lease = entry.leaseUntil = None
            if attempt is None:
                entry.due = nextAttempt or self._now()
                continue
            nid = entry.report.notification_id
            made = dataclasses.replace(attempt, notification_id=nid, report_id=reportId)
            self._reportAttempts.setdefault(nid, []).append(made)
            if nextAttempt is None:
                del self._reports[reportId]
            else:
                entry.due, entry.attempts = nextAttempt, entry.attempts + 1
        return written

    @_answered
    def reportAttempts(self, notificationId: str) -> list[ReportAttempt]:
        return list(self._reportAttempts.get(notificationId, ()))

    @_answered
    def pendingReports(self) -> int:
        return len(self._reports)

    @_answered
    def markGone(self, url: str) -> None:
        self._gone.add(url)

    @_answered
    def isGone(self, url: str) -> bool:
        return url in self._gone

    @_answered
    def webhookSecrets(self, account: str) -> tuple[str, ...]:
        return self._webhookSecrets.get(account, ())

    @_answered
    def setWebhookSecrets(self, account: str, secrets: Iterable[str]) -> None:
        self._requireAccount(account)
        self._webhookSecrets[account] = tuple(secrets)

    @_answered
    def sharedKey(self, name: str, candidate: bytes) -> bytes:
        return self._sharedKeys.setdefault(name, candidate)

    # -- IGatewayIds --

    @_answered
    def rememberGatewayIds(
        self, notificationId: str, recipient: Recipient, ids: Iterable[str], until: datetime
    ) -> None:
        if notificationId not in self._notifications:
            raise NotFound(f"no such notification: {notificationId}")
        text = _Text(notificationId, recipient, until)
        for gatewayId in ids:
            taken = self._gatewayIds.get(gatewayId)
            if taken is not None:
                taken.ids.discard(gatewayId)
            text.ids.add(gatewayId)
            self._gatewayIds[gatewayId] = text

    def _text(self, gatewayId: str) -> _Text | None:
        """The unsettled text ``gatewayId`` belongs to, if it is not past its time."""
        text = self._gatewayIds.get(gatewayId)
        if text is None or text.until < self._now():
            return None
        return text

    @_answered
    def lookupGatewayId(self, gatewayId: str) -> tuple[str, Recipient, tuple[str, ...]] | None:
        text = self._text(gatewayId)
        if text is None:
            return None
        return (text.notificationId, text.recipient, tuple(sorted(text.ids)))

    @_answered
    def settleGatewayId(self, gatewayId: str, delivered: bool = True) -> bool:
        text = self._text(gatewayId)
        if text is None:
            return False
        settled = [gatewayId] if delivered else list(text.ids)
        for part in settled:
            text.ids.discard(part)
            del self._gatewayIds[part]
        return not text.ids


def _value(sender: Sender) -> str:
    return sender.value


def _number(notificationId: str) -> int:
    """The number of a notification id, for ordering (ids this store made are numbers)."""
    number = idNumber(notificationId)
    return -1 if number is None else number


# -- the SMTP side: an avatar, a portal, and what the real portal needs to run at once --


@implementer(ISubmission)
class FakeSubmission:
    """
    An SMTP avatar (:class:`~mailrelay.interfaces.ISubmission`) that decides nothing: every
    sender is taken as given, every recipient as an email address, every message is kept in
    :attr:`messages` (as ``(sender, recipients, message)``) and answered with an id of its
    own. Set :attr:`refusal` to an exception (a ``mailrelay.policy.decisions.Refusal``) to
    have the next decisions raise it instead.
    """

    def __init__(self, account: Account | None = None) -> None:
        self.account = account or Account(name="acme", password_hash="")
        self.messages: list[tuple[Any, tuple[Recipient, ...], bytes]] = []
        self.refusal: Exception | None = None

    def _refuse(self) -> None:
        if self.refusal is not None:
            raise self.refusal

    def validateFrom(
        self, session: SessionInfo, sender: str, smtputf8: bool = False, size: int | None = None
    ) -> str:
        self._refuse()
        return sender

    def validateTo(
        self,
        session: SessionInfo,
        sender: Any,
        recipient: str,
        accepted: Sequence[Recipient],
        smtputf8: bool = False,
    ) -> Recipient:
        self._refuse()
        return Recipient(recipient, "email")

    def acceptMessage(
        self, session: SessionInfo, sender: Any, recipients: Sequence[Recipient], message: bytes
    ) -> Deferred[str]:
        self._refuse()
        self.messages.append((sender, tuple(recipients), bytes(message)))
        return succeed(str(len(self.messages)))


@implementer(IRealm)
class _OneAvatarRealm:
    def __init__(self, avatar: Any) -> None:
        self._avatar = avatar

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        if ISubmission not in interfaces:
            raise NotImplementedError("this realm only makes ISubmission avatars")
        return (ISubmission, self._avatar, lambda: None)


def fakePortal(avatar: Any, passwords: dict[str, str]) -> Portal:
    """A portal that logs in the users of ``passwords`` (name -> password, kept in memory)
    and gives every one of them ``avatar``. Its answers come at once."""
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    for name, password in passwords.items():
        checker.addUser(name.encode(), password.encode())
    return Portal(_OneAvatarRealm(avatar), [checker])


class SynchronousReactor(Clock):
    """
    A ``task.Clock`` that also takes ``callFromThread``, calling at once: with a
    :class:`SynchronousThreadPool`, ``deferToThreadPool`` then answers before it returns. It
    is what ``makePortal`` needs as its reactor for a portal whose logins complete at once.
    """

    def callFromThread(self, f: Callable[..., object], *args: object, **kwargs: object) -> None:
        f(*args, **kwargs)


class SynchronousThreadPool:
    """Stands in for a ``ThreadPool``: runs each function at once, in the calling thread."""

    def callInThreadWithCallback(
        self,
        onResult: Callable[[bool, object], object] | None,
        func: Callable[..., object],
        *args: object,
        **kwargs: object,
    ) -> None:
        try:
            result: object = func(*args, **kwargs)
            ok = True
        except BaseException:
            result, ok = Failure(), False
        if onResult is not None:
            onResult(ok, result)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


_cheapHasher = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def cheapPasswordHash(password: str) -> str:
    """An Argon2id hash of ``password`` with the smallest parameters: the real verification
    (``mailrelay.auth.secrets.verifyPassword``) takes microseconds on it instead of a large
    fraction of a second. For test accounts only."""
    return _cheapHasher.hash(password)
