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

Several processes may open the same file (the ``mailrelay`` admin command while the server runs):
SQLite's locks serialise their writes, and a busy timeout makes each wait its turn.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
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
from mailrelay.interfaces import AlreadyExists, IStore, NotFound, StoreError
from mailrelay.model import (
    Account,
    ApiKey,
    HeaderOptions,
    MessageText,
    Notification,
    QueueStats,
    Recipient,
    Sender,
    StatusEvent,
    joinText,
    textPieces,
)
from mailrelay.store.common import (
    ACCOUNT_CACHE_ENTRIES,
    ACCOUNT_CACHE_SECONDS,
    QueueEntry,
    fromMillis,
    idNumber,
    recipientsFromJSON,
    recipientsJSON,
    toMillis,
    trailWithReceived,
)
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

_PENDING_STATES = ("queued", "deferred", "in_flight")
_DAY_MS = 86_400_000


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

    def enqueue(self, notification: Notification, message: MessageText) -> Deferred[None]:
        pieces = textPieces(message)
        return self._writer.submit(
            _Enqueue(notification, pieces, sum(map(len, pieces)), self._segments)
        )

    def acceptedSince(self, account: str, since: datetime) -> Deferred[int]:
        d = self._reader.submitEach(partial(_acceptedSince, account=account, since=toMillis(since)))
        return d.addCallback(lambda counts: sum(count for _, count in counts))

    def stats(self) -> Deferred[QueueStats]:
        def total(parts: list[tuple[Path, QueueStats]]) -> QueueStats:
            counts = {state: sum(getattr(p, state) for _, p in parts) for state in _PENDING_STATES}
            return QueueStats(**counts)

        return self._reader.submitEach(_stats).addCallback(total)

    # -- delivery workers (not part of IStore yet) --

    def claim(self, limit: int, leaseSeconds: float) -> Deferred[list[QueueEntry]]:
        """
        Take up to ``limit`` due queue entries (oldest due first) for delivery: they become
        ``in_flight`` for ``leaseSeconds``; an entry whose lease runs out (its worker died) is
        due again. Each claim counts as an attempt. Returns Deferred[list[QueueEntry]].
        """
        return Deferred.fromCoroutine(self._claim(limit, leaseSeconds))

    async def _claim(self, limit: int, leaseSeconds: float) -> list[QueueEntry]:
        now = int(self._reactor.seconds() * 1000)
        # The oldest due entries of all files, then each file's share claimed in its own write
        # (which takes only those still due: another claimer may have come first).
        due = await self._reader.submitEach(partial(_dueEntries, limit=limit, now=now))
        chosen = sorted((key, file) for file, keys in due for key in keys)[:limit]
        entries: list[QueueEntry] = []
        for file in dict.fromkeys(file for _, file in chosen):
            numbers = [number for (_, number), f in chosen if f == file]
            work = partial(
                _claim, numbers=numbers, now=now, leaseUntil=now + int(leaseSeconds * 1000)
            )
            try:
                claimed, unreadable = await self._writer.submit(work, file)
            except StoreError as e:
                # What the other files gave is claimed already: hand it out rather than leave
                # it in flight until its lease runs out.
                self.log.warn("claim: {file} failed: {error}", file=str(file), error=str(e))
                continue
            entries += claimed
            # A damaged body stays queued (and is reported at every claim) without holding up
            # the others.
            for number, error in unreadable:
                self.log.error(
                    "claim: notification {id} left queued: {error}", id=number, error=error
                )
        rank = {number: i for i, ((_, number), _) in enumerate(chosen)}
        return sorted(entries, key=lambda e: rank[int(e.notification.notification_id)])

    def complete(self, notificationId: str) -> Deferred[None]:
        """Delivery is finished (sent or failed for good): leave the queue, drop the body."""
        return self._inTheQueue(notificationId, partial(_complete, notificationId=notificationId))

    def defer(self, notificationId: str, nextAttempt: datetime) -> Deferred[None]:
        """Delivery failed for now: try again at ``nextAttempt``."""
        work = partial(_defer, notificationId=notificationId, nextAttempt=toMillis(nextAttempt))
        return self._inTheQueue(notificationId, work)

    def _inTheQueue(self, notificationId: str, work: Work) -> Deferred[None]:
        """Run ``work`` (which returns how many queue rows it changed) on the file that holds
        the notification, and no other (a write locks its file); NotFound if it is in no
        file's queue."""
        return Deferred.fromCoroutine(self._changeQueueEntry(notificationId, work))

    async def _changeQueueEntry(self, notificationId: str, work: Work) -> None:
        number = _requireId(notificationId)
        found = await self._reader.submitEach(partial(_present, numbers=(number,)))
        for file, present in found:
            if present and await self._writer.submit(work, file):
                return
        raise NotFound(f"not in the queue: {notificationId}")

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
        d = self._writer.submitEach(partial(_expire, before=toMillis(before)))
        return d.addCallback(lambda counts: sum(count for _, count in counts))


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
    counts = dict.fromkeys(_PENDING_STATES, 0)
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
    if row[12] is not None:
        recipients = recipientsFromJSON(row[12])
    else:  # accepted before schema version 4: a row per recipient
        recipients = tuple(
            Recipient(address=address, channel=channel)
            for address, channel in connection.execute(
                "SELECT address, channel FROM recipients WHERE notification_id = ? "
                "ORDER BY position",
                (number,),
            )
        )
    return Notification(
        notification_id=str(number),
        account=row[0],
        sender=row[1],
        recipients=recipients,
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


def _expire(connection: sqlite3.Connection, before: int) -> int:
    # Recipients, bodies and status events go with their notification (ON DELETE CASCADE).
    cursor = connection.execute(
        "DELETE FROM notifications WHERE received_at < ? AND id NOT IN "
        "(SELECT notification_id FROM queue WHERE state IN (?, ?, ?))",
        (before, *_PENDING_STATES),
    )
    # The counts of days wholly before ``before`` (no quota looks back that far).
    connection.execute("DELETE FROM daily_counts WHERE day < ?", (before // _DAY_MS,))
    _sweepSegments(connection)
    return cursor.rowcount


def _sweepSegments(connection: sqlite3.Connection) -> None:
    """Delete the body segments no row needs any more (delivered or expired messages')."""
    referenced = connection.execute(
        "SELECT DISTINCT body_segment FROM messages WHERE body_segment IS NOT NULL"
    )
    sweepSegments(_segmentsOf(connection), (segment for (segment,) in referenced))


def _nothing(connection: sqlite3.Connection) -> None:
    """A write that changes nothing: connecting for it brings the file's schema up to date."""


def _dueEntries(connection: sqlite3.Connection, limit: int, now: int) -> list[tuple[int, int]]:
    """The oldest due queue entries of this file, as (next_attempt, id)."""
    return connection.execute(
        "SELECT next_attempt, notification_id FROM queue WHERE next_attempt <= ? "
        "ORDER BY next_attempt, notification_id LIMIT ?",
        (now, limit),
    ).fetchall()


def _claim(
    connection: sqlite3.Connection, numbers: Sequence[int], now: int, leaseUntil: int
) -> tuple[list[QueueEntry], list[tuple[int, str]]]:
    """Claim the entries ``numbers`` that are still due, in that order. Returns them, and the
    notifications left unclaimed because their body cannot be read, with why."""
    entries = []
    unreadable = []
    for number in numbers:
        row = connection.execute(
            "SELECT attempts FROM queue WHERE notification_id = ? AND next_attempt <= ?",
            (number, now),
        ).fetchone()
        if row is None:
            continue  # claimed or finished meanwhile
        try:
            body = _body(connection, number)
        except StoreError as e:
            unreadable.append((number, str(e)))
            continue
        connection.execute(
            "UPDATE queue SET state = 'in_flight', next_attempt = ?, attempts = attempts + 1 "
            "WHERE notification_id = ?",
            (leaseUntil, number),
        )
        notification = _loadNotification(connection, number)
        assert notification is not None  # the queue row's foreign key
        entries.append(QueueEntry(notification, body, row[0] + 1))
    return entries, unreadable


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


def _complete(connection: sqlite3.Connection, notificationId: str) -> int:
    """Take the notification out of this file's queue, if it is there; how many rows went."""
    number = _requireId(notificationId)
    cursor = connection.execute("DELETE FROM queue WHERE notification_id = ?", (number,))
    if cursor.rowcount:
        connection.execute("DELETE FROM messages WHERE notification_id = ?", (number,))
    return cursor.rowcount


def _defer(connection: sqlite3.Connection, notificationId: str, nextAttempt: int) -> int:
    """Put off the notification's next attempt, if it is in this file's queue; how many rows
    changed."""
    cursor = connection.execute(
        "UPDATE queue SET state = 'deferred', next_attempt = ? WHERE notification_id = ?",
        (nextAttempt, _requireId(notificationId)),
    )
    return cursor.rowcount
