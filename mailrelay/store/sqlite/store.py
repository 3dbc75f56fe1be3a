"""
The embedded store: everything mailrelay keeps, in one SQLite file (WAL mode, fsync on commit),
but for message bodies of ``EXTERNAL_BODY_MIN`` or more, which go to segment files beside it
(:mod:`mailrelay.store.sqlite.bodies`) and are on disk before their rows commit.

Threads. No SQLite call runs on the reactor thread:

- *writes* go to one :class:`~mailrelay.store.sqlite.threads.GroupCommitThread` that owns the
  only write connection and commits waiting requests together (one fsync for a group), so the
  Deferred of :meth:`SQLiteStore.enqueue` fires only after the message is on disk;
- *reads* go to one reader thread with its own connection. WAL lets it read while the writer
  writes. Reads are indexed lookups costing microseconds, and the hop to a thread costs a few
  tens; in exchange a cold page cache, a checkpoint or a slow disk never stalls the reactor that
  serves every SMTP connection (and an AUTH already spends ~50 ms in Argon2 anyway).

Every failure reaches the caller as :class:`~mailrelay.interfaces.StoreError` (or its
AlreadyExists / NotFound subclasses), never as a raw ``sqlite3`` exception.

Files. The main file (``mailrelay.sqlite3``) holds the accounts, API keys and senders, and the
notifications the main process accepted. With several workers, worker *K* writes the
notifications it accepts to a file of its own beside it, ``mailrelay.worker-K.sqlite3``, so no
process's intake waits for another's commits. Reads look in every file there is (a
notification lives in exactly one), so the status API and the admin command see all of them,
from any process, whatever ``workers`` is now; a delivery update writes only the file that holds
its notification. The main process brings every worker's file to the current schema at open.

Delivery. A claim reads the due entries of every file (ranges of the queue's index by state
and due time) on the reader thread, then claims each file's share in a write that takes only
those still due; every later write about a claimed notification -- renewing its lease,
recording an outcome with its status events, giving it back -- is one transaction on the file
that holds it, which checks the lease token in that transaction (LeaseLost, nothing written,
if it is not current). Expiry deletes in batches of ``EXPIRE_BATCH``, a transaction each.

Several processes may open the same file (the ``mailrelay`` admin command while the server runs):
SQLite's locks serialise their writes, and a busy timeout makes each wait its turn.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache, partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.ids import NotificationIdGenerator
from mailrelay.interfaces import (
    AlreadyExists,
    InsufficientCredits,
    IStore,
    LeaseLost,
    NotFound,
    StoreError,
)
from mailrelay.model import (
    Account,
    ApiKey,
    ClaimedReport,
    Delivery,
    DkimKey,
    HeaderOptions,
    MessageText,
    Notification,
    PendingReport,
    QueueItem,
    QueueState,
    QueueStats,
    Recipient,
    ReportAttempt,
    Sender,
    StatusEvent,
    joinText,
    textPieces,
)
from mailrelay.store.common import (
    ACCOUNT_CACHE_ENTRIES,
    ACCOUNT_CACHE_SECONDS,
    fairShare,
    fromMillis,
    idNumber,
    pendingJSON,
    pendingPositions,
    recipientsAt,
    recipientsFromJSON,
    recipientsJSON,
    toMillis,
    trailWithReceived,
    withoutFinished,
)
from mailrelay.store.sqlite import gatewayids
from mailrelay.store.sqlite import reports as outbox
from mailrelay.store.sqlite.bodies import (
    EXTERNAL_BODY_MIN,
    BodyLocation,
    SegmentWriter,
    readBody,
    segmentDirectory,
    sweepSegments,
)
from mailrelay.store.sqlite.migrate import upgrade
from mailrelay.store.sqlite.threads import DatabaseThread, GroupCommitThread, Work

BUSY_TIMEOUT = 10.0
"""Seconds a connection waits for another process's lock before giving up (-> StoreError)."""

_QUEUE_STATES: tuple[QueueState, ...] = ("queued", "deferred", "in_flight", "held")
_DAY_MS = 86_400_000
EXPIRE_BATCH = 500
"""Notifications one expiry write looks at: the writer is free for enqueues between them."""
_MOST_REMEMBERED_FILES = 100_000
"""Claimed notifications whose file a store remembers; past it, it forgets them all."""

NumberedWork = Callable[..., Any]
"""Work about one queue entry: ``work(connection, number=...)`` (the notification id as
stored; None for some: every entry)."""


def workerFile(main: Path, index: int) -> Path:
    """The file worker ``index`` (1, 2, ...) writes the notifications it accepts to, beside the
    main file ``main``: ``mailrelay.worker-1.sqlite3`` for ``mailrelay.sqlite3``."""
    return main.with_name(f"{main.stem}.worker-{index}{main.suffix}")


@implementer(IStore)
class SQLiteStore:
    """
    The SQLite backend of :class:`~mailrelay.interfaces.IStore`, in the file ``path``.

    ``reactor`` must run threads and tell time (the real reactor); ``instanceId`` goes into the
    notification ids (see :mod:`mailrelay.ids`); ``groupLimit`` caps how many writes share one
    commit; ``busyTimeout`` is how long to wait for another process's lock; ``home``, the file
    this process's enqueues go to (default: ``path``, the main file; a worker's: see
    :func:`workerFile`). Call :meth:`open` first and :meth:`close` last. ``commits`` counts the
    write transactions committed so far.

    Accounts, API keys and senders are read on every login and every new session, and change
    rarely: lookups of them are remembered for ``ACCOUNT_CACHE_SECONDS``. This process's own
    changes clear what is remembered at once; another process's (the admin command line's)
    are seen within that time.
    """

    name = "sqlite"
    log = Logger()
    expireBatch = EXPIRE_BATCH

    def __init__(
        self,
        path: Path,
        reactor: Any,
        instanceId: int = 0,
        groupLimit: int = 256,
        busyTimeout: float = BUSY_TIMEOUT,
        home: Path | None = None,
    ) -> None:
        self.path = Path(path)
        self.home = Path(home) if home is not None else self.path
        self._busyTimeout = busyTimeout
        self._reactor: IReactorTime = reactor
        self._threads: IReactorThreads = reactor
        self._newId = NotificationIdGenerator(instanceId, reactor.seconds)
        self._writer = GroupCommitThread(
            "mailrelay-sqlite-writer",
            self._connectWriter,
            reactor,
            self.home,
            self.notificationFiles,
            groupLimit,
        )
        self._reader = DatabaseThread(
            "mailrelay-sqlite-reader",
            self._connectReader,
            reactor,
            self.path,
            self.notificationFiles,
        )
        self._accountData: dict[tuple[str, str], tuple[float, Any]] = {}
        self._claimedIn: dict[int, Path] = {}
        # Only the writer thread appends to the home file's segments (see bodies.py).
        self._segments = SegmentWriter(segmentDirectory(self.home))

    def __repr__(self) -> str:
        return f"<SQLiteStore {str(self.path)!r}>"

    @property
    def commits(self) -> int:
        """How many write transactions have been committed (fsync'd) since :meth:`open`."""
        return self._writer.commits

    # -- lifecycle --

    def notificationFiles(self) -> list[Path]:
        """Every file notifications may be in: the main file, then the workers' files that
        exist, in worker order."""
        workers = []
        for candidate in self.path.parent.glob(f"{self.path.stem}.worker-*{self.path.suffix}"):
            index = candidate.name[len(self.path.stem) + len(".worker-") : -len(self.path.suffix)]
            if index.isascii() and index.isdigit():
                workers.append((int(index), candidate))
        return [self.path, *(file for _, file in sorted(workers))]

    def _connect(self, path: Path, create: bool) -> sqlite3.Connection:
        # Readers never create a file: a missing one is an error, not a new empty database.
        target = path if create else f"file:{quote(str(path))}?mode=rw"
        return sqlite3.connect(
            target,
            timeout=self._busyTimeout,
            isolation_level=None,
            check_same_thread=True,
            uri=not create,
        )

    def _connectWriter(self, path: Path) -> sqlite3.Connection:
        connection = self._connect(path, create=True)
        try:
            (mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode.lower() != "wal":
                raise StoreError(f"sqlite store: cannot use WAL journal mode (got {mode!r})")
            connection.execute("PRAGMA synchronous = FULL")
            connection.execute("PRAGMA foreign_keys = ON")
            upgrade(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def _connectReader(self, path: Path) -> sqlite3.Connection | None:
        connection = self._connect(path, create=False)
        try:
            connection.execute("PRAGMA query_only = ON")
            (version,) = connection.execute("PRAGMA user_version").fetchone()
        except BaseException:
            connection.close()
            raise
        if version == 0 and path != self.path:
            connection.close()
            return None  # a worker's file whose schema is still being written
        return connection

    async def _open(self) -> None:
        try:
            await self._writer.start()  # creates or upgrades the schema first
            if self.home == self.path:
                # The main process (or the admin command) brings the workers' files to this
                # schema too, before anything reads them with its queries: a worker upgrades
                # its own only when it starts, and one no longer configured never does.
                await self._writer.submitEach(_nothing)
            await self._reader.start()
        except BaseException:
            await self.close()
            raise
        self.log.info("sqlite store open: {path}", path=str(self.path))

    def open(self) -> Deferred[None]:
        """Open (creating or upgrading) the database. Returns Deferred[None]."""
        return Deferred.fromCoroutine(self._open())

    async def _close(self) -> None:
        await self._writer.stop()
        await self._reader.stop()
        self._segments.close()

    def close(self) -> Deferred[None]:
        """Finish every write already asked for, then close. Returns Deferred[None]."""
        return Deferred.fromCoroutine(self._close())

    def ping(self) -> Deferred[float]:
        """Round trip through the reader thread, to every file (an unreadable worker file
        fails it, as it fails the reads). Returns Deferred[float] (seconds)."""
        started = time.perf_counter()
        d = self._reader.submitEach(lambda c: c.execute("SELECT 1").fetchone())
        return d.addCallback(lambda _: time.perf_counter() - started)

    # -- accounts, API keys, senders --

    def _remembered(self, key: tuple[str, str], work: Work) -> Deferred[Any]:
        """``work``'s result on the reader thread, or what it gave less than a moment ago."""
        now = self._reactor.seconds()
        hit = self._accountData.get(key)
        if hit is not None and hit[0] > now:
            return succeed(hit[1])

        def remember(value: Any) -> Any:
            if len(self._accountData) >= ACCOUNT_CACHE_ENTRIES:
                self._accountData.clear()
            self._accountData[key] = (now + ACCOUNT_CACHE_SECONDS, value)
            return value

        return self._reader.submit(work).addCallback(remember)

    def _changeAccountData(self, work: Work) -> Deferred[Any]:
        """Run a write that changes accounts, keys or senders; forget what was remembered."""
        self._accountData.clear()

        def forget(result: Any) -> Any:
            self._accountData.clear()
            return result

        return self._writer.submit(work, self.path).addBoth(forget)

    def addAccount(self, name: str, passwordHash: str) -> Deferred[Account]:
        return self._changeAccountData(partial(_addAccount, name=name, passwordHash=passwordHash))

    def getAccount(self, name: str) -> Deferred[Account | None]:
        return self._remembered(("account", name), partial(_getAccount, name=name))

    def listAccounts(self) -> Deferred[list[Account]]:
        return self._reader.submit(_listAccounts)

    def updateAccount(self, account: Account) -> Deferred[None]:
        return self._changeAccountData(partial(_updateAccount, account=account))

    def addApiKey(self, account: str, keyId: str, keyHash: str) -> Deferred[ApiKey]:
        createdAt = int(self._reactor.seconds() * 1000)
        return self._changeAccountData(
            partial(_addApiKey, account=account, keyId=keyId, keyHash=keyHash, createdAt=createdAt)
        )

    def findApiKey(self, keyHash: str) -> Deferred[ApiKey | None]:
        return self._remembered(("apikey", keyHash), partial(_findApiKey, keyHash=keyHash))

    def listApiKeys(self, account: str) -> Deferred[list[ApiKey]]:
        return self._reader.submit(partial(_listApiKeys, account=account))

    def revokeApiKey(self, account: str, keyId: str) -> Deferred[bool]:
        return self._changeAccountData(partial(_revokeApiKey, account=account, keyId=keyId))

    def addSender(self, sender: Sender) -> Deferred[None]:
        return self._changeAccountData(partial(_addSender, sender=sender))

    def listSenders(self, account: str) -> Deferred[list[Sender]]:
        return self._remembered(
            ("senders", account), partial(_listSenders, account=account)
        ).addCallback(list)

    def removeSender(self, account: str, value: str) -> Deferred[bool]:
        return self._changeAccountData(partial(_removeSender, account=account, value=value))

    # -- the queue --

    def nextNotificationId(self) -> str:
        return self._newId()

    def enqueue(
        self, notification: Notification, message: MessageText, smsCredits: int = 0
    ) -> Deferred[None]:
        pieces = textPieces(message)
        work = _Enqueue(notification, pieces, sum(map(len, pieces)), self._segments)
        if smsCredits <= 0:
            return self._writer.submit(work)
        charge = partial(_takeCredits, account=notification.account, credits=smsCredits)
        if self.home == self.path:
            # The accounts are in this file: credits and message in one transaction.
            return self._changeAccountData(_EnqueueCharged(work, charge))
        return Deferred.fromCoroutine(self._enqueueChargedElsewhere(work, charge, smsCredits))

    async def _enqueueChargedElsewhere(self, work: _Enqueue, charge: Work, credits: int) -> None:
        """A worker process: the accounts are in the main file, the message goes to this
        process's own, so the credits are taken first (atomically, in the main file) and
        given back if the message cannot be stored. A crash in between loses them."""
        await self._changeAccountData(charge)
        try:
            await self._writer.submit(work)
        except BaseException:
            refund = partial(_takeCredits, account=work.notification.account, credits=-credits)
            await self._changeAccountData(refund)
            raise

    def acceptedSince(self, account: str, since: datetime) -> Deferred[int]:
        d = self._reader.submitEach(partial(_acceptedSince, account=account, since=toMillis(since)))
        return d.addCallback(lambda counts: sum(count for _, count in counts))

    def stats(self) -> Deferred[QueueStats]:
        def total(parts: list[tuple[Path, QueueStats]]) -> QueueStats:
            counts = {state: sum(getattr(p, state) for _, p in parts) for state in _QUEUE_STATES}
            return QueueStats(**counts)

        return self._reader.submitEach(_stats).addCallback(total)

    # -- the delivery queue --

    def _now(self) -> int:
        return int(self._reactor.seconds() * 1000)

    def claimDue(self, limit: int, leaseSeconds: float) -> Deferred[list[Delivery]]:
        return Deferred.fromCoroutine(self._claimDue(limit, leaseSeconds))

    async def _claimDue(self, limit: int, leaseSeconds: float) -> list[Delivery]:
        if limit <= 0:
            return []
        now = self._now()
        # The oldest due entries of each kind in every file (an index range each), the share
        # of each chosen over all files, then each file's share claimed in its own write,
        # which takes only those still due: another claimer may have come first.
        due = await self._reader.submitEach(partial(_dueEntries, limit=limit, now=now))
        fresh = sorted((key, file) for file, (keys, _) in due for key in keys)
        retries = sorted((key, file) for file, (_, keys) in due for key in keys)
        chosen = fairShare(fresh, retries, limit)
        leaseUntil = now + int(leaseSeconds * 1000)
        deliveries: list[Delivery] = []
        for file in dict.fromkeys(file for _, file in chosen):
            numbers = [number for (_, number), f in chosen if f == file]
            work = partial(_claimEntries, numbers=numbers, now=now, leaseUntil=leaseUntil)
            try:
                claimed, unreadable = await self._writer.submit(work, file)
            except StoreError as e:
                # What the other files gave is claimed already: hand it out rather than leave
                # it in flight until its lease runs out.
                self.log.warn("claim: {file} failed: {error}", file=str(file), error=str(e))
                continue
            for delivery in claimed:
                self._rememberFile(int(delivery.notification.notification_id), file)
            deliveries += claimed
            # A damaged body stays queued (and is reported at every claim) without holding up
            # the others.
            for number, error in unreadable:
                self.log.error(
                    "claim: notification {id} left queued: {error}", id=number, error=error
                )
        rank = {number: i for i, ((_, number), _) in enumerate(chosen)}
        return sorted(deliveries, key=lambda d: rank[int(d.notification.notification_id)])

    def _rememberFile(self, number: int, file: Path) -> None:
        """Remember which file holds a claimed notification, for the writes about it (a
        notification never moves, so what is remembered stays true)."""
        if len(self._claimedIn) >= _MOST_REMEMBERED_FILES:
            self._claimedIn.clear()
        self._claimedIn[number] = file

    async def _fileOf(self, number: int) -> Path | None:
        """The file that holds notification ``number``, or None if none does."""
        file = self._claimedIn.get(number)
        if file is not None:
            return file
        found = await self._reader.submitEach(partial(_present, numbers=(number,)))
        return next((file for file, present in found if present), None)

    async def _onItsFile(
        self, notificationId: str, work: NumberedWork, missing: StoreError | None
    ) -> Any:
        """``work(connection, number=...)`` on the file that holds the notification; if no
        file does, fails with ``missing`` (None: returns None)."""
        number = _requireId(notificationId)
        file = await self._fileOf(number)
        if file is None:
            if missing is None:
                return None
            raise missing
        return await self._writer.submit(partial(work, number=number), file)

    def renewLease(self, notificationId: str, lease: str, leaseSeconds: float) -> Deferred[None]:
        work = partial(_renewLease, lease=lease, until=self._now() + int(leaseSeconds * 1000))
        return Deferred.fromCoroutine(
            self._onItsFile(notificationId, work, LeaseLost(f"not queued: {notificationId}"))
        )

    def recordOutcome(
        self,
        notificationId: str,
        lease: str,
        events: Iterable[StatusEvent],
        finished: Iterable[Recipient],
        nextAttempt: datetime | None,
        reports: Iterable[PendingReport] = (),
    ) -> Deferred[None]:
        return Deferred.fromCoroutine(
            self._recordOutcome(
                notificationId,
                lease,
                tuple(events),
                tuple(finished),
                nextAttempt,
                tuple(reports),
            )
        )

    async def _recordOutcome(
        self,
        notificationId: str,
        lease: str,
        events: tuple[StatusEvent, ...],
        finished: tuple[Recipient, ...],
        nextAttempt: datetime | None,
        reports: tuple[PendingReport, ...] = (),
    ) -> None:
        if any(event.notification_id != notificationId for event in events) or any(
            report.notification_id != notificationId for report in reports
        ):
            raise StoreError(f"recordOutcome: events of another notification than {notificationId}")
        work = partial(
            _recordOutcome,
            lease=lease,
            events=events,
            finished=finished,
            nextAttempt=None if nextAttempt is None else toMillis(nextAttempt),
            reports=reports,
            now=self._now(),
        )
        lost = LeaseLost(f"not queued: {notificationId}")
        segment = await self._onItsFile(notificationId, work, lost)
        await self._sweep(notificationId, segment)

    async def _sweep(self, notificationId: str, segment: int | None) -> None:
        """Delete the body segment a write left unreferenced, if any, in a write of its own:
        only once no committed row can need it again."""
        if segment is None:
            return
        file = await self._fileOf(_requireId(notificationId))
        if file is None:
            return
        try:
            await self._writer.submit(partial(_sweepSegment, segment=segment), file)
        except StoreError as e:  # the next expiry sweeps it
            self.log.warn("could not delete body segment {n}: {error}", n=segment, error=str(e))

    def releaseLease(self, notificationId: str, lease: str) -> Deferred[None]:
        work = partial(_releaseLease, lease=lease, now=self._now())
        return Deferred.fromCoroutine(
            self._onItsFile(notificationId, work, LeaseLost(f"not queued: {notificationId}"))
        )

    def queueItems(
        self, state: QueueState | None, account: str | None, limit: int
    ) -> Deferred[list[QueueItem]]:
        d = self._reader.submitEach(partial(_queueItems, state=state, account=account, limit=limit))
        return d.addCallback(
            lambda parts: sorted(
                (item for _, items in parts for item in items),
                key=lambda item: (item.next_attempt, int(item.notification_id)),
            )[:limit]
        )

    def queueItem(self, notificationId: str) -> Deferred[QueueItem | None]:
        if idNumber(notificationId) is None:
            return succeed(None)
        d = self._reader.submitEach(partial(_queueItem, number=int(notificationId)))
        return d.addCallback(lambda found: next((i for _, i in found if i is not None), None))

    def retryNow(self, notificationId: str | None) -> Deferred[int]:
        return self._queueChange(notificationId, partial(_retryNow, now=self._now()))

    def hold(self, notificationId: str | None, account: str | None) -> Deferred[int]:
        if notificationId is None and account is None:
            return _failedWith(StoreError("hold: name a notification or an account"))
        return self._queueChange(notificationId, partial(_hold, account=account))

    def release(self, notificationId: str | None, account: str | None) -> Deferred[int]:
        return self._queueChange(
            notificationId, partial(_release, account=account, now=self._now())
        )

    def _queueChange(self, notificationId: str | None, work: NumberedWork) -> Deferred[int]:
        """``work(connection, number=...)``, which counts what it changed: on the file of the
        notification named (0 if there is none), or with None on every file (the sum)."""
        if notificationId is None:
            d = self._writer.submitEach(partial(work, number=None))
            return d.addCallback(lambda counts: sum(count for _, count in counts))
        if idNumber(notificationId) is None:
            return succeed(0)
        d = Deferred.fromCoroutine(self._onItsFile(notificationId, work, None))
        return d.addCallback(lambda count: count or 0)

    def deleteQueued(
        self, notificationId: str, statusText: str, at: datetime
    ) -> Deferred[list[Recipient]]:
        return Deferred.fromCoroutine(self._deleteQueued(notificationId, statusText, at))

    async def _deleteQueued(
        self, notificationId: str, statusText: str, at: datetime
    ) -> list[Recipient]:
        work = partial(_deleteQueued, statusText=statusText, at=toMillis(at))
        failed, segment = await self._onItsFile(
            notificationId, work, NotFound(f"not in the queue: {notificationId}")
        )
        await self._sweep(notificationId, segment)
        return failed

    # -- DKIM keys --

    def putDkimKey(self, key: DkimKey) -> Deferred[None]:
        return self._changeAccountData(partial(_putDkimKey, key=key))

    def getDkimKey(self, domain: str) -> Deferred[DkimKey | None]:
        return self._remembered(("dkim", domain), partial(_getDkimKey, domain=domain))

    def listDkimKeys(self) -> Deferred[list[DkimKey]]:
        return self._reader.submit(_listDkimKeys)

    def removeDkimKey(self, domain: str) -> Deferred[bool]:
        return self._changeAccountData(partial(_removeDkimKey, domain=domain))

    # -- status trails --

    def getNotification(self, notificationId: str) -> Deferred[Notification | None]:
        d = self._reader.submitEach(partial(_getNotification, notificationId=notificationId))
        return d.addCallback(lambda found: next((n for _, n in found if n is not None), None))

    def addEvents(self, events: Iterable[StatusEvent]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._addEvents(tuple(events)))

    async def _addEvents(self, events: tuple[StatusEvent, ...]) -> None:
        # Nothing is stored if any notification is unknown: every file is looked in first.
        # The writes are then one transaction per file, so if one fails after another file's
        # went in, the caller sees the failure with part of the events stored.
        numbers = {_requireId(e.notification_id) for e in events}
        found = await self._reader.submitEach(partial(_present, numbers=tuple(numbers)))
        if set().union(*(present for _, present in found)) != numbers:
            raise NotFound("status events for an unknown notification")
        for file, present in found:
            mine = tuple(e for e in events if int(e.notification_id) in present)
            if mine:
                await self._writer.submit(partial(_addEvents, events=mine), file)

    def statusTrail(self, notificationId: str) -> Deferred[list[StatusEvent]]:
        d = self._reader.submitEach(partial(_statusTrail, notificationId=notificationId))
        return d.addCallback(lambda trails: [event for _, trail in trails for event in trail])

    def notificationsForBulk(self, account: str, bulkId: str) -> Deferred[list[str]]:
        d = self._reader.submitEach(partial(_notificationsForBulk, account=account, bulkId=bulkId))
        return d.addCallback(
            lambda parts: [str(n) for _, n in sorted(key for _, keys in parts for key in keys)]
        )

    def expire(self, before: datetime) -> Deferred[int]:
        return Deferred.fromCoroutine(self._expire(toMillis(before)))

    async def _expire(self, before: int) -> int:
        # A write per batch of ``expireBatch`` notifications looked at, so that a long history
        # (or a long queue, whose notifications are looked at and kept) never holds the
        # writer, and the enqueues waiting for it, in one long statement. The first batch
        # runs on every file that is ready, the rest on each of those files in turn.
        deleted = 0
        work = partial(_expireBatch, before=before, after=_EXPIRE_START, batch=self.expireBatch)
        for file, (gone, after) in await self._writer.submitEach(work):
            deleted += gone
            while after is not None:
                work = partial(_expireBatch, before=before, after=after, batch=self.expireBatch)
                gone, after = await self._writer.submit(work, file)
                deleted += gone
        await self._writer.submitEach(partial(_expireFinish, before=before, now=self._now()))
        return deleted

    # -- the report outbox (IReportQueue; the work is in mailrelay.store.sqlite.reports) --

    def addEventsWithReports(
        self, events: Iterable[StatusEvent], reports: Iterable[PendingReport]
    ) -> Deferred[None]:
        return Deferred.fromCoroutine(self._addEventsWithReports(tuple(events), tuple(reports)))

    async def _addEventsWithReports(
        self, events: tuple[StatusEvent, ...], reports: tuple[PendingReport, ...]
    ) -> None:
        ids = {e.notification_id for e in events} | {r.notification_id for r in reports}
        if len(ids) > 1:
            raise StoreError("addEventsWithReports: events of more than one notification")
        if not ids:
            return
        (notificationId,) = ids
        now = self._now()

        def work(connection: sqlite3.Connection, number: int) -> None:
            _addEvents(connection, events)
            outbox.addReports(connection, reports, now)

        await self._onItsFile(
            notificationId, work, NotFound("status events for an unknown notification")
        )

    def claimReports(self, limit: int, leaseSeconds: float) -> Deferred[list[ClaimedReport]]:
        return Deferred.fromCoroutine(self._claimReports(limit, leaseSeconds))

    async def _claimReports(self, limit: int, leaseSeconds: float) -> list[ClaimedReport]:
        if limit <= 0:
            return []
        now = self._now()
        work = partial(
            outbox.claimReports,
            limit=limit,
            now=now,
            leaseUntil=now + int(leaseSeconds * 1000),
            lease=secrets.token_hex(8),
        )
        claimed = [c for _, part in await self._writer.submitEach(work) for c in part]
        claimed.sort(key=lambda c: c.report.created_at)
        return claimed[:limit]

    def recordReportAttempt(
        self,
        claims: Iterable[tuple[str, str]],
        attempt: ReportAttempt | None,
        nextAttempt: datetime | None,
    ) -> Deferred[int]:
        work = partial(
            outbox.recordReportAttempt,
            claims=tuple(claims),
            attempt=attempt,
            nextAttempt=None if nextAttempt is None else toMillis(nextAttempt),
        )
        d = self._writer.submitEach(work)
        return d.addCallback(lambda counts: sum(count for _, count in counts))

    def reportAttempts(self, notificationId: str) -> Deferred[list[ReportAttempt]]:
        if idNumber(notificationId) is None:
            return succeed([])
        d = self._reader.submitEach(partial(outbox.reportAttempts, number=int(notificationId)))
        return d.addCallback(
            lambda parts: sorted((a for _, part in parts for a in part), key=lambda a: a.at)
        )

    def pendingReports(self) -> Deferred[int]:
        def count(connection: sqlite3.Connection) -> int:
            return int(connection.execute("SELECT count(*) FROM reports").fetchone()[0])

        return self._reader.submitEach(count).addCallback(lambda parts: sum(n for _, n in parts))

    def markGone(self, url: str) -> Deferred[None]:
        def mark(connection: sqlite3.Connection) -> None:
            connection.execute(
                "INSERT OR IGNORE INTO gone_urls (url, at) VALUES (?, ?)", (url, self._now())
            )

        return self._writer.submit(mark, self.path)

    def isGone(self, url: str) -> Deferred[bool]:
        def gone(connection: sqlite3.Connection) -> bool:
            row = connection.execute("SELECT 1 FROM gone_urls WHERE url = ?", (url,)).fetchone()
            return row is not None

        return self._reader.submit(gone)

    def webhookSecrets(self, account: str) -> Deferred[tuple[str, ...]]:
        def read(connection: sqlite3.Connection) -> tuple[str, ...]:
            row = connection.execute(
                "SELECT secrets FROM webhook_secrets WHERE account = ?", (account,)
            ).fetchone()
            return () if row is None else tuple(json.loads(row[0]))

        return self._remembered(("webhook", account), read)

    def setWebhookSecrets(self, account: str, secrets: Sequence[str]) -> Deferred[None]:
        def write(connection: sqlite3.Connection) -> None:
            _requireAccount(connection, account)
            connection.execute(
                "INSERT OR REPLACE INTO webhook_secrets (account, secrets) VALUES (?, ?)",
                (account, json.dumps(list(secrets))),
            )

        return self._changeAccountData(write)

    def sharedKey(self, name: str, candidate: bytes) -> Deferred[bytes]:
        def keep(connection: sqlite3.Connection) -> bytes:
            connection.execute(
                "INSERT OR IGNORE INTO shared_keys (name, value) VALUES (?, ?)", (name, candidate)
            )
            (value,) = connection.execute(
                "SELECT value FROM shared_keys WHERE name = ?", (name,)
            ).fetchone()
            return bytes(value)

        return self._writer.submit(keep, self.path)

    # -- SMS gateway ids (IGatewayIds; the work is in mailrelay.store.sqlite.gatewayids) --

    def rememberGatewayIds(
        self, notificationId: str, recipient: Recipient, ids: Iterable[str], until: datetime
    ) -> Deferred[None]:
        ids = tuple(ids)
        if not ids:
            return succeed(None)
        work = partial(
            gatewayids.rememberGatewayIds, recipient=recipient, ids=ids, until=toMillis(until)
        )
        missing = NotFound(f"gateway ids of an unknown notification {notificationId}")
        return Deferred.fromCoroutine(self._onItsFile(notificationId, work, missing))

    def lookupGatewayId(
        self, gatewayId: str
    ) -> Deferred[tuple[str, Recipient, tuple[str, ...]] | None]:
        d = self._reader.submitEach(
            partial(gatewayids.lookupGatewayId, gatewayId=gatewayId, now=self._now())
        )
        return d.addCallback(lambda found: next((t for _, t in found if t is not None), None))

    def settleGatewayId(self, gatewayId: str, delivered: bool = True) -> Deferred[bool]:
        work = partial(
            gatewayids.settleGatewayId, gatewayId=gatewayId, delivered=delivered, now=self._now()
        )
        return self._writer.submitEach(work).addCallback(
            lambda settled: any(done for _, done in settled)
        )


# The work functions below run on a database thread, inside a transaction the thread manages
# (writes) or in autocommit mode (reads).

_ACCOUNT_FIELDS = tuple(f.name for f in dataclasses.fields(Account))
"""The accounts table's columns, named as the Account fields, in the order of _accountRow."""
_ACCOUNT_COLUMNS = ", ".join(_ACCOUNT_FIELDS)


def _accountFromRow(row: Sequence[Any]) -> Account:
    return Account(
        name=row[0],
        password_hash=row[1],
        enabled=bool(row[2]),
        sms_enabled=bool(row[3]),
        sms_segments=row[4],
        rate_per_second=row[5],
        daily_quota=row[6],
        networks=tuple(json.loads(row[7])),
        require_alternative=bool(row[8]),
        require_rcpt_headers=bool(row[9]),
        attachments=row[10],
        max_message_size=row[11],
        max_recipients=row[12],
        bounces=bool(row[13]),
        sms_credits=row[14],
    )


def _accountRow(account: Account) -> tuple[Any, ...]:
    return (
        account.name,
        account.password_hash,
        int(account.enabled),
        int(account.sms_enabled),
        account.sms_segments,
        account.rate_per_second,
        account.daily_quota,
        json.dumps(list(account.networks)),
        int(account.require_alternative),
        int(account.require_rcpt_headers),
        account.attachments,
        account.max_message_size,
        account.max_recipients,
        int(account.bounces),
        account.sms_credits,
    )


def _requireAccount(connection: sqlite3.Connection, name: str) -> None:
    if connection.execute("SELECT 1 FROM accounts WHERE name = ?", (name,)).fetchone() is None:
        raise NotFound(f"no such account: {name}")


def _addAccount(connection: sqlite3.Connection, name: str, passwordHash: str) -> Account:
    account = Account(name=name, password_hash=passwordHash)
    try:
        connection.execute(
            f"INSERT INTO accounts ({_ACCOUNT_COLUMNS}) "  # noqa: S608
            f"VALUES ({', '.join('?' * len(_ACCOUNT_FIELDS))})",
            _accountRow(account),
        )
    except sqlite3.IntegrityError:
        raise AlreadyExists(f"account exists already: {name}") from None
    return account


def _getAccount(connection: sqlite3.Connection, name: str) -> Account | None:
    row = connection.execute(
        f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE name = ?",  # noqa: S608
        (name,),
    ).fetchone()
    return None if row is None else _accountFromRow(row)


def _listAccounts(connection: sqlite3.Connection) -> list[Account]:
    rows = connection.execute(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts ORDER BY name")  # noqa: S608
    return [_accountFromRow(row) for row in rows]


def _updateAccount(connection: sqlite3.Connection, account: Account) -> None:
    assignments = ", ".join(f"{column} = ?" for column in _ACCOUNT_FIELDS[1:])
    row = _accountRow(account)
    cursor = connection.execute(
        f"UPDATE accounts SET {assignments} WHERE name = ?",  # noqa: S608
        (*row[1:], row[0]),
    )
    if cursor.rowcount == 0:
        raise NotFound(f"no such account: {account.name}")


def _apiKeyFromRow(row: Sequence[Any]) -> ApiKey:
    return ApiKey(key_id=row[0], account=row[1], created_at=fromMillis(row[2]))


def _addApiKey(
    connection: sqlite3.Connection, account: str, keyId: str, keyHash: str, createdAt: int
) -> ApiKey:
    _requireAccount(connection, account)
    try:
        connection.execute(
            "INSERT INTO api_keys (key_id, account, key_hash, created_at) VALUES (?, ?, ?, ?)",
            (keyId, account, keyHash, createdAt),
        )
    except sqlite3.IntegrityError:
        raise AlreadyExists(f"API key exists already: {keyId}") from None
    return ApiKey(key_id=keyId, account=account, created_at=fromMillis(createdAt))


def _findApiKey(connection: sqlite3.Connection, keyHash: str) -> ApiKey | None:
    row = connection.execute(
        "SELECT key_id, account, created_at FROM api_keys WHERE key_hash = ? AND revoked = 0",
        (keyHash,),
    ).fetchone()
    return None if row is None else _apiKeyFromRow(row)


def _listApiKeys(connection: sqlite3.Connection, account: str) -> list[ApiKey]:
    rows = connection.execute(
        "SELECT key_id, account, created_at FROM api_keys WHERE account = ? AND revoked = 0 "
        "ORDER BY created_at, rowid",
        (account,),
    )
    return [_apiKeyFromRow(row) for row in rows]


def _revokeApiKey(connection: sqlite3.Connection, account: str, keyId: str) -> bool:
    cursor = connection.execute(
        "UPDATE api_keys SET revoked = 1 WHERE account = ? AND key_id = ? AND revoked = 0",
        (account, keyId),
    )
    return cursor.rowcount > 0


def _addSender(connection: sqlite3.Connection, sender: Sender) -> None:
    _requireAccount(connection, sender.account)
    try:
        connection.execute(
            "INSERT INTO senders (account, value, kind) VALUES (?, ?, ?)",
            (sender.account, sender.value, sender.kind),
        )
    except sqlite3.IntegrityError:
        raise AlreadyExists(f"sender exists already: {sender.value}") from None


def _listSenders(connection: sqlite3.Connection, account: str) -> list[Sender]:
    rows = connection.execute(
        "SELECT account, value, kind FROM senders WHERE account = ? ORDER BY value", (account,)
    )
    return [Sender(account=row[0], value=row[1], kind=row[2]) for row in rows]


def _removeSender(connection: sqlite3.Connection, account: str, value: str) -> bool:
    cursor = connection.execute(
        "DELETE FROM senders WHERE account = ? AND value = ?", (account, value)
    )
    return cursor.rowcount > 0


def _requireId(notificationId: str) -> int:
    number = idNumber(notificationId)
    if number is None:
        raise StoreError(f"not a notification id: {notificationId!r}")
    return number


@dataclass(frozen=True)
class _Enqueue:
    """The write of one accepted notification; the writer batches consecutive ones."""

    notification: Notification
    message: tuple[bytes | memoryview, ...]  # in pieces, joined only if stored in the row
    size: int
    segments: SegmentWriter  # where the body goes if it is EXTERNAL_BODY_MIN or larger

    def __call__(self, connection: sqlite3.Connection) -> None:
        _enqueueAll(connection, [self])

    @staticmethod
    def runBatch(connection: sqlite3.Connection, works: Sequence[_Enqueue]) -> list[None]:
        _enqueueAll(connection, works)
        return [None] * len(works)


def _takeCredits(connection: sqlite3.Connection, account: str, credits: int) -> None:
    """Take ``credits`` SMS credits (give them back if negative) from an account that has a
    prepaid limit and that many; InsufficientCredits otherwise. One statement: two writers
    cannot both take the last ones."""
    cursor = connection.execute(
        "UPDATE accounts SET sms_credits = sms_credits - ? "
        "WHERE name = ? AND (sms_credits IS NULL OR sms_credits >= ?)",
        (credits, account, credits),
    )
    if cursor.rowcount == 0:
        raise InsufficientCredits("the account's SMS credits do not cover the message")


@dataclass(frozen=True)
class _EnqueueCharged:
    """An enqueue that takes SMS credits in its own transaction (no batch: it may fail alone)."""

    work: _Enqueue
    charge: Work

    def __call__(self, connection: sqlite3.Connection) -> None:
        self.charge(connection)
        _enqueueAll(connection, [self.work])


def _enqueueAll(connection: sqlite3.Connection, works: Sequence[_Enqueue]) -> None:
    """Insert notifications (their recipients in their row, which implies their CAAS_RECEIVED
    events), bodies and queue entries: one multi-row insert per table for all of them
    (:func:`_insertRows`). The large bodies are written to a segment file first, all together,
    and are on disk before the rows that point at them are inserted."""
    notifications, queue = [], []
    messages: list[tuple[int, bytes, *tuple[int | None, ...]]] = []
    large = [work.message for work in works if work.size >= EXTERNAL_BODY_MIN]
    locations = iter(works[0].segments.append(large) if large else ())
    perDay: Counter[tuple[str, int]] = Counter()
    for work in works:
        notification = work.notification
        number = _requireId(notification.notification_id)
        receivedAt = toMillis(notification.received_at)
        options = notification.options
        notifications.append(
            (
                number,
                notification.account,
                notification.sender,
                notification.size,
                receivedAt,
                options.bulk_id,
                options.notify_url,
                options.notify_content_type,
                options.callback_data,
                int(options.intermediate_report),
                options.tracking_url,
                notification.client_address,
                notification.helo,
                recipientsJSON(notification.recipients),
            )
        )
        if work.size >= EXTERNAL_BODY_MIN:
            where = next(locations)
            crc, crc32c = (None, where.crc) if where.castagnoli else (where.crc, None)
            messages.append((number, b"", where.segment, where.offset, where.length, crc, crc32c))
        else:
            messages.append((number, joinText(work.message), None, None, None, None, None))
        queue.append((number, receivedAt, "queued"))
        perDay[notification.account, receivedAt // _DAY_MS] += 1
    try:
        _insertRows(
            connection,
            "notifications (id, account, sender, size, received_at, bulk_id, notify_url, "
            "notify_content_type, callback_data, intermediate_report, tracking_url, "
            "client_address, helo, recipient_list)",
            notifications,
        )
    except sqlite3.IntegrityError:
        ids = ", ".join(w.notification.notification_id for w in works)
        raise AlreadyExists(f"notification exists already: {ids}") from None
    _insertRows(
        connection,
        "messages (notification_id, body, body_segment, body_offset, body_length, body_crc, "
        "body_crc32c)",
        messages,
    )
    _insertRows(connection, "queue (notification_id, next_attempt, state)", queue)
    _insertRows(
        connection,
        "daily_counts (account, day, accepted)",
        [(account, day, count) for (account, day), count in perDay.items()],
        " ON CONFLICT (account, day) DO UPDATE SET accepted = accepted + excluded.accepted",
    )


_MOST_ROWS_PER_INSERT = 64


@lru_cache(maxsize=256)
def _insertStatement(into: str, columns: int, rows: int, suffix: str) -> str:
    row = "(" + ", ".join("?" * columns) + ")"
    # Only this module's constant table and column names and placeholders: no values.
    return f"INSERT INTO {into} VALUES {', '.join([row] * rows)}{suffix}"  # noqa: S608


def _insertRows(
    connection: sqlite3.Connection, into: str, rows: Sequence[tuple[Any, ...]], suffix: str = ""
) -> None:
    """
    Insert ``rows`` with as few statements as possible: a multi-row ``VALUES`` for up to 64 rows
    at a time, in chunks of powers of two so that few distinct statements are prepared.

    SQLite runs a statement in one call that lets go of the GIL once; ``executemany`` makes one
    such call per row, and each time the writer thread must win the GIL back from the busy
    reactor thread, which can take a whole switch interval.
    """
    if not rows:
        return
    columns = len(rows[0])
    start = 0
    while start < len(rows):
        count = min(_MOST_ROWS_PER_INSERT, 1 << ((len(rows) - start).bit_length() - 1))
        chunk = rows[start : start + count]
        connection.execute(
            _insertStatement(into, columns, count, suffix),
            [value for row in chunk for value in row],
        )
        start += count


def _acceptedSince(connection: sqlite3.Connection, account: str, since: int) -> int:
    if since % _DAY_MS == 0:  # since a midnight (the daily quota): the per-day counts
        (count,) = connection.execute(
            "SELECT COALESCE(SUM(accepted), 0) FROM daily_counts WHERE account = ? AND day >= ?",
            (account, since // _DAY_MS),
        ).fetchone()
    else:
        (count,) = connection.execute(
            "SELECT COUNT(*) FROM notifications WHERE account = ? AND received_at >= ?",
            (account, since),
        ).fetchone()
    return int(count)


def _stats(connection: sqlite3.Connection) -> QueueStats:
    counts = dict.fromkeys(_QUEUE_STATES, 0)
    for state, count in connection.execute("SELECT state, COUNT(*) FROM queue GROUP BY state"):
        counts[state] = count
    return QueueStats(**counts)


def _loadNotification(connection: sqlite3.Connection, number: int) -> Notification | None:
    row = connection.execute(
        "SELECT account, sender, size, received_at, bulk_id, notify_url, notify_content_type, "
        "callback_data, intermediate_report, tracking_url, client_address, helo, recipient_list "
        "FROM notifications WHERE id = ?",
        (number,),
    ).fetchone()
    if row is None:
        return None
    return Notification(
        notification_id=str(number),
        account=row[0],
        sender=row[1],
        recipients=_recipients(connection, number, row[12]),
        size=row[2],
        received_at=fromMillis(row[3]),
        options=HeaderOptions(
            bulk_id=row[4],
            notify_url=row[5],
            notify_content_type=row[6],
            callback_data=row[7],
            intermediate_report=bool(row[8]),
            tracking_url=row[9],
        ),
        client_address=row[10],
        helo=row[11],
    )


def _recipients(
    connection: sqlite3.Connection, number: int, recipientList: str | None
) -> tuple[Recipient, ...]:
    """Notification ``number``'s recipients, in RCPT order, from its ``recipient_list``."""
    if recipientList is not None:
        return recipientsFromJSON(recipientList)
    # Accepted before schema version 4: a row per recipient.
    return tuple(
        Recipient(address=address, channel=channel)
        for address, channel in connection.execute(
            "SELECT address, channel FROM recipients WHERE notification_id = ? ORDER BY position",
            (number,),
        )
    )


def _getNotification(connection: sqlite3.Connection, notificationId: str) -> Notification | None:
    number = idNumber(notificationId)
    if number is None:
        return None
    with _snapshot(connection):  # the notification and its recipients (before schema 4)
        return _loadNotification(connection, number)


@contextmanager
def _snapshot(connection: sqlite3.Connection) -> Iterator[None]:
    """One snapshot for the reads inside: a reader connection is in autocommit mode, where each
    query would see the file as it is at that query."""
    connection.execute("BEGIN")
    try:
        yield
    finally:
        connection.execute("COMMIT")


def _addEvents(connection: sqlite3.Connection, events: tuple[StatusEvent, ...]) -> None:
    rows = []
    for event in events:
        number = _requireId(event.notification_id)
        rows.append(
            (
                number,
                event.recipient.address,
                event.recipient.channel,
                event.status_code,
                event.status_text,
                toMillis(event.timestamp),
            )
        )
    try:
        connection.executemany(
            "INSERT INTO status_events (notification_id, address, channel, status_code, "
            "status_text, ts) VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
    except sqlite3.IntegrityError:
        # The foreign key: events for a notification this store does not have (or expired).
        raise NotFound("status events for an unknown notification") from None


def _statusTrail(connection: sqlite3.Connection, notificationId: str) -> list[StatusEvent]:
    number = idNumber(notificationId)
    if number is None:
        return []
    with _snapshot(connection):  # the notification and its events
        head = connection.execute(
            "SELECT received_at, recipient_list FROM notifications WHERE id = ?", (number,)
        ).fetchone()
        rows = connection.execute(
            "SELECT address, channel, status_code, status_text, ts FROM status_events "
            "WHERE notification_id = ? ORDER BY ts, id",
            (number,),
        ).fetchall()
    trail = [
        StatusEvent(
            notification_id=notificationId,
            recipient=Recipient(address=address, channel=channel),
            status_code=code,
            status_text=text,
            timestamp=fromMillis(ts),
        )
        for address, channel, code, text, ts in rows
    ]
    if head is None or head[1] is None:
        return trail
    return trailWithReceived(
        notificationId, recipientsFromJSON(head[1]), fromMillis(head[0]), trail
    )


def _present(connection: sqlite3.Connection, numbers: tuple[int, ...]) -> set[int]:
    """Which of the notifications ``numbers`` this file has."""
    return {
        number
        for number in numbers
        if connection.execute("SELECT 1 FROM notifications WHERE id = ?", (number,)).fetchone()
    }


def _notificationsForBulk(
    connection: sqlite3.Connection, account: str, bulkId: str
) -> list[tuple[int, int]]:
    """The bulk's notifications in this file as (received_at, id), in that order."""
    return connection.execute(
        "SELECT received_at, id FROM notifications WHERE account = ? AND bulk_id = ? "
        "ORDER BY received_at, id",
        (account, bulkId),
    ).fetchall()


_EXPIRE_START = (-(2**63), -(2**63))
"""Where expiry starts: before every (received_at, id)."""


def _expireBatch(
    connection: sqlite3.Connection, before: int, after: tuple[int, int], batch: int
) -> tuple[int, tuple[int, int] | None]:
    """
    Look at up to ``batch`` notifications received before ``before`` that come after
    ``after`` in (received_at, id) order, through notifications_by_time, and delete those not
    in the queue (in any state), with everything kept about them. Returns how many went and
    where the next batch starts (None: none is left).
    """
    rows = connection.execute(
        "SELECT received_at, id FROM notifications WHERE received_at < ? "
        "AND (received_at, id) > (?, ?) ORDER BY received_at, id LIMIT ?",
        (before, *after, batch),
    ).fetchall()
    doomed = [
        (number,)
        for _, number in rows
        if connection.execute("SELECT 1 FROM queue WHERE notification_id = ?", (number,)).fetchone()
        is None
    ]
    # Recipients, bodies, status events and gateway ids go with their notification (ON DELETE
    # CASCADE); the reports and their attempts have no foreign key (schema 010).
    connection.executemany("DELETE FROM reports WHERE notification_id = ?", doomed)
    connection.executemany("DELETE FROM report_attempts WHERE notification_id = ?", doomed)
    connection.executemany("DELETE FROM notifications WHERE id = ?", doomed)
    return len(doomed), (rows[-1] if len(rows) == batch else None)


def _expireFinish(connection: sqlite3.Connection, before: int, now: int) -> None:
    """After the notifications: the counts of days wholly before ``before`` (no quota looks
    back that far), the gateway ids whose time has passed by ``now``, and the body segments
    no row refers to any more."""
    connection.execute("DELETE FROM daily_counts WHERE day < ?", (before // _DAY_MS,))
    gatewayids.forgetPast(connection, now)
    _sweepSegments(connection)


def _sweepSegments(connection: sqlite3.Connection) -> None:
    """Delete the body segments no row needs any more (delivered or expired messages')."""
    sweepSegments(_segmentsOf(connection), _referencedSegments(connection))


def _referencedSegments(connection: sqlite3.Connection) -> list[int]:
    """The segments some row refers to: one step down messages_by_segment per segment, not
    a read of every message's entry."""
    found: list[int] = []
    segment = -1
    while True:
        (segment,) = connection.execute(
            "SELECT MIN(body_segment) FROM messages WHERE body_segment IS NOT NULL "
            "AND body_segment > ?",
            (segment,),
        ).fetchone()
        if segment is None:
            return found
        found.append(segment)


def _sweepSegment(connection: sqlite3.Connection, segment: int) -> None:
    """Delete body segment ``segment`` if no row refers to it (any more) and it is not the
    newest (see :func:`~mailrelay.store.sqlite.bodies.sweepSegments`)."""
    if connection.execute(
        "SELECT 1 FROM messages WHERE body_segment = ? LIMIT 1", (segment,)
    ).fetchone():
        return
    sweepSegments(_segmentsOf(connection), _referencedSegments(connection))


def _nothing(connection: sqlite3.Connection) -> None:
    """A write that changes nothing: connecting for it brings the file's schema up to date."""


_DUE = (
    "SELECT next_attempt, notification_id FROM queue WHERE state = ? AND next_attempt <= ? "
    "ORDER BY next_attempt, notification_id LIMIT ?"
)
"""Due entries of one state, oldest first: a range of queue_by_state_due, in its order."""


def _dueEntries(
    connection: sqlite3.Connection, limit: int, now: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """This file's oldest due entries, as (next_attempt, id): up to ``limit`` never tried
    (``queued``), and up to ``limit`` retries (``deferred``, and ``in_flight`` whose lease
    has run out)."""
    fresh = connection.execute(_DUE, ("queued", now, limit)).fetchall()
    deferred = connection.execute(_DUE, ("deferred", now, limit)).fetchall()
    lapsed = connection.execute(_DUE, ("in_flight", now, limit)).fetchall()
    return fresh, sorted(deferred + lapsed)[:limit]


def _claimEntries(
    connection: sqlite3.Connection, numbers: Sequence[int], now: int, leaseUntil: int
) -> tuple[list[Delivery], list[tuple[int, str]]]:
    """Claim the entries ``numbers`` that are still due, in that order, each under a new
    lease. Returns them, and the notifications left unclaimed because their body cannot be
    read, with why."""
    deliveries = []
    unreadable = []
    for number in numbers:
        row = connection.execute(
            "SELECT state, attempts, pending, hold_requested FROM queue "
            "WHERE notification_id = ? AND state != 'held' AND next_attempt <= ?",
            (number, now),
        ).fetchone()
        if row is None:
            continue  # claimed or finished meanwhile
        state, attempts, pending, holdRequested = row
        if state == "in_flight" and holdRequested:
            # Its worker died while an operator held it: held, as a retry would have made it.
            connection.execute(
                "UPDATE queue SET state = 'held', lease = NULL, hold_requested = 0 "
                "WHERE notification_id = ?",
                (number,),
            )
            continue
        try:
            body = _body(connection, number)
        except StoreError as e:
            unreadable.append((number, str(e)))
            continue
        lease = secrets.token_hex(8)
        connection.execute(
            "UPDATE queue SET state = 'in_flight', next_attempt = ?, attempts = attempts + 1, "
            "lease = ? WHERE notification_id = ?",
            (leaseUntil, lease, number),
        )
        notification = _loadNotification(connection, number)
        assert notification is not None  # the queue row's foreign key
        recipients = notification.recipients
        deliveries.append(
            Delivery(
                notification=notification,
                message=body,
                pending=recipientsAt(recipients, pendingPositions(recipients, pending)),
                attempts=attempts + 1,
                lease=lease,
            )
        )
    return deliveries, unreadable


def _leased(
    connection: sqlite3.Connection, number: int, lease: str
) -> tuple[int, str | None, bool]:
    """The attempts, pending positions and hold request of the entry in flight under
    ``lease``; LeaseLost if that is not its current lease (or it is not in flight)."""
    row = connection.execute(
        "SELECT lease, attempts, pending, hold_requested FROM queue "
        "WHERE notification_id = ? AND state = 'in_flight'",
        (number,),
    ).fetchone()
    if row is None or row[0] != lease:
        raise LeaseLost(f"the lease on {number} is not current")
    return row[1], row[2], bool(row[3])


def _renewLease(connection: sqlite3.Connection, number: int, lease: str, until: int) -> None:
    _leased(connection, number, lease)
    connection.execute(
        "UPDATE queue SET next_attempt = ? WHERE notification_id = ?", (until, number)
    )


def _recordOutcome(
    connection: sqlite3.Connection,
    number: int,
    lease: str,
    events: tuple[StatusEvent, ...],
    finished: tuple[Recipient, ...],
    nextAttempt: int | None,
    reports: tuple[PendingReport, ...] = (),
    now: int = 0,
) -> int | None:
    """The write of :meth:`SQLiteStore.recordOutcome`. Returns the body segment it left
    unreferenced, if any, to be deleted once this has committed."""
    _, pending, holdRequested = _leased(connection, number, lease)
    _addEvents(connection, events)
    outbox.addReports(connection, reports, now)
    recipients = _queuedRecipients(connection, number)
    left = withoutFinished(recipients, pendingPositions(recipients, pending), finished)
    if not left:
        connection.execute("DELETE FROM queue WHERE notification_id = ?", (number,))
        return _dropBody(connection, number)
    if nextAttempt is None:
        connection.execute(
            "UPDATE queue SET pending = ? WHERE notification_id = ?", (pendingJSON(left), number)
        )
    else:
        connection.execute(
            "UPDATE queue SET state = ?, next_attempt = ?, pending = ?, lease = NULL, "
            "hold_requested = 0 WHERE notification_id = ?",
            ("held" if holdRequested else "deferred", nextAttempt, pendingJSON(left), number),
        )
    return None


def _queuedRecipients(connection: sqlite3.Connection, number: int) -> tuple[Recipient, ...]:
    (recipientList,) = connection.execute(
        "SELECT recipient_list FROM notifications WHERE id = ?", (number,)
    ).fetchone()
    return _recipients(connection, number, recipientList)


def _dropBody(connection: sqlite3.Connection, number: int) -> int | None:
    """Delete notification ``number``'s body. Returns its segment if no other row refers to
    it now (None: the body was in its row, or the segment is still needed)."""
    row = connection.execute(
        "SELECT body_segment FROM messages WHERE notification_id = ?", (number,)
    ).fetchone()
    connection.execute("DELETE FROM messages WHERE notification_id = ?", (number,))
    if row is None or row[0] is None:
        return None
    stillNeeded = connection.execute(
        "SELECT 1 FROM messages WHERE body_segment = ? LIMIT 1", (row[0],)
    ).fetchone()
    return None if stillNeeded else int(row[0])


def _releaseLease(connection: sqlite3.Connection, number: int, lease: str, now: int) -> None:
    attempts, _, holdRequested = _leased(connection, number, lease)
    attempts = max(attempts - 1, 0)
    state = "held" if holdRequested else "queued" if attempts == 0 else "deferred"
    connection.execute(
        "UPDATE queue SET state = ?, next_attempt = ?, attempts = ?, lease = NULL, "
        "hold_requested = 0 WHERE notification_id = ?",
        (state, now, attempts, number),
    )


_QUEUE_ITEMS = (
    "SELECT q.notification_id, q.state, q.next_attempt, q.attempts, q.pending, n.account, "
    "n.sender, n.received_at, n.size, n.recipient_list "
    "FROM queue AS q JOIN notifications AS n ON n.id = q.notification_id "
)


def _queueItemFromRow(connection: sqlite3.Connection, row: Sequence[Any]) -> QueueItem:
    number, state, nextAttempt, attempts, pending, account, sender, received, size, listed = row
    recipients = _recipients(connection, number, listed)
    return QueueItem(
        notification_id=str(number),
        account=account,
        sender=sender,
        state=state,
        next_attempt=fromMillis(nextAttempt),
        attempts=attempts,
        pending=recipientsAt(recipients, pendingPositions(recipients, pending)),
        received_at=fromMillis(received),
        size=size,
    )


def _queueItems(
    connection: sqlite3.Connection, state: QueueState | None, account: str | None, limit: int
) -> list[QueueItem]:
    """This file's first ``limit`` entries (by next attempt) of ``state`` (None: of each
    state), of ``account`` (None: of every one)."""
    items = []
    with _snapshot(connection):
        for each in (state,) if state is not None else _QUEUE_STATES:
            rows = connection.execute(
                _QUEUE_ITEMS + "WHERE q.state = ? AND (? IS NULL OR n.account = ?) "
                "ORDER BY q.next_attempt, q.notification_id LIMIT ?",
                (each, account, account, limit),
            ).fetchall()
            items += [_queueItemFromRow(connection, row) for row in rows]
    return items


def _queueItem(connection: sqlite3.Connection, number: int) -> QueueItem | None:
    with _snapshot(connection):
        row = connection.execute(_QUEUE_ITEMS + "WHERE q.notification_id = ?", (number,)).fetchone()
        return None if row is None else _queueItemFromRow(connection, row)


_OF_ACCOUNT = "(SELECT account FROM notifications WHERE id = queue.notification_id) = ?"
"""An account's queue entries: a look-up of each entry's notification (there is no index of
notifications by account, and the queue is the shorter list)."""


def _retryNow(connection: sqlite3.Connection, number: int | None, now: int) -> int:
    if number is not None:
        cursor = connection.execute(
            "UPDATE queue SET next_attempt = MIN(next_attempt, ?) "
            "WHERE notification_id = ? AND state IN ('queued', 'deferred')",
            (now, number),
        )
        return cursor.rowcount
    connection.execute(
        "UPDATE queue SET next_attempt = ? WHERE state IN ('queued', 'deferred') "
        "AND next_attempt > ?",
        (now, now),
    )
    (count,) = connection.execute(
        "SELECT COUNT(*) FROM queue WHERE state IN ('queued', 'deferred')"
    ).fetchone()
    return int(count)


def _hold(connection: sqlite3.Connection, number: int | None, account: str | None) -> int:
    """Hold the entry ``number``, or (None) every entry of ``account``; returns how many of
    them are held now (entries in flight are marked, to be held when their attempt ends)."""
    where, args = (
        ("notification_id = ?", (number,)) if number is not None else (_OF_ACCOUNT, (account,))
    )
    connection.execute(
        f"UPDATE queue SET state = 'held' WHERE state IN ('queued', 'deferred') AND {where}",  # noqa: S608
        args,
    )
    connection.execute(
        f"UPDATE queue SET hold_requested = 1 WHERE state = 'in_flight' AND {where}",  # noqa: S608
        args,
    )
    (count,) = connection.execute(
        f"SELECT COUNT(*) FROM queue WHERE state = 'held' AND {where}",  # noqa: S608
        args,
    ).fetchone()
    return int(count)


def _release(
    connection: sqlite3.Connection, number: int | None, account: str | None, now: int
) -> int:
    """Release the entry ``number``, or (None) every entry of ``account``, or (both None)
    every entry: held ones are due at once, and in-flight ones no longer to be held."""
    args: tuple[Any, ...]
    if number is not None:
        where, args = "notification_id = ?", (number,)
    elif account is not None:
        where, args = _OF_ACCOUNT, (account,)
    else:
        where, args = "1", ()
    cursor = connection.execute(
        "UPDATE queue SET state = CASE WHEN attempts = 0 THEN 'queued' ELSE 'deferred' END, "  # noqa: S608
        f"next_attempt = ? WHERE state = 'held' AND {where}",
        (now, *args),
    )
    released = cursor.rowcount
    connection.execute(
        "UPDATE queue SET hold_requested = 0 WHERE state = 'in_flight' AND hold_requested = 1 "  # noqa: S608
        f"AND {where}",
        args,
    )
    return released


def _deleteQueued(
    connection: sqlite3.Connection, number: int, statusText: str, at: int
) -> tuple[list[Recipient], int | None]:
    """Fail the pending recipients of queue entry ``number`` with CAAS_FAILED and take it
    out of the queue. Returns them, and the body segment left unreferenced (if any)."""
    row = connection.execute(
        "SELECT pending FROM queue WHERE notification_id = ?", (number,)
    ).fetchone()
    if row is None:
        raise NotFound(f"not in the queue: {number}")
    recipients = _queuedRecipients(connection, number)
    failed = recipientsAt(recipients, pendingPositions(recipients, row[0]))
    _addEvents(
        connection,
        tuple(
            StatusEvent(str(number), recipient, "CAAS_FAILED", statusText, fromMillis(at))
            for recipient in failed
        ),
    )
    connection.execute("DELETE FROM queue WHERE notification_id = ?", (number,))
    return list(failed), _dropBody(connection, number)


def _dkimKeyFromRow(row: Sequence[Any]) -> DkimKey:
    return DkimKey(
        domain=row[0],
        selector=row[1],
        algorithm=row[2],
        private_key=bytes(row[3]),
        created_at=fromMillis(row[4]),
    )


_DKIM_COLUMNS = "domain, selector, algorithm, private_key, created_at"


def _putDkimKey(connection: sqlite3.Connection, key: DkimKey) -> None:
    connection.execute(
        f"INSERT OR REPLACE INTO dkim_keys ({_DKIM_COLUMNS}) VALUES (?, ?, ?, ?, ?)",  # noqa: S608
        (key.domain, key.selector, key.algorithm, bytes(key.private_key), toMillis(key.created_at)),
    )


def _getDkimKey(connection: sqlite3.Connection, domain: str) -> DkimKey | None:
    row = connection.execute(
        f"SELECT {_DKIM_COLUMNS} FROM dkim_keys WHERE domain = ?",  # noqa: S608
        (domain,),
    ).fetchone()
    return None if row is None else _dkimKeyFromRow(row)


def _listDkimKeys(connection: sqlite3.Connection) -> list[DkimKey]:
    rows = connection.execute(f"SELECT {_DKIM_COLUMNS} FROM dkim_keys ORDER BY domain")  # noqa: S608
    return [_dkimKeyFromRow(row) for row in rows]


def _removeDkimKey(connection: sqlite3.Connection, domain: str) -> bool:
    return connection.execute("DELETE FROM dkim_keys WHERE domain = ?", (domain,)).rowcount > 0


def _body(connection: sqlite3.Connection, number: int) -> bytes:
    """The message body of notification ``number``: from its row, or from its segment file."""
    body, segment, offset, length, crc, crc32c = connection.execute(
        "SELECT body, body_segment, body_offset, body_length, body_crc, body_crc32c "
        "FROM messages WHERE notification_id = ?",
        (number,),
    ).fetchone()
    if segment is None:
        return bytes(body)
    castagnoli = crc32c is not None
    where = BodyLocation(segment, offset, length, crc32c if castagnoli else crc, castagnoli)
    return readBody(_segmentsOf(connection), where)


def _segmentsOf(connection: sqlite3.Connection) -> Path:
    """The segment directory of the database file ``connection`` is open on."""
    for _, name, file in connection.execute("PRAGMA database_list"):
        if name == "main":
            return segmentDirectory(file)
    raise StoreError("sqlite store: the connection has no main database")


def _failedWith(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d
