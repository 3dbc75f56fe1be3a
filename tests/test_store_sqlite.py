"""
Tests for the embedded SQLite store: the shared store suite, then what only SQLite promises --
data on disk across restarts and crashes, group commit, and StoreError for every failure.
Real files under the trial temp directory; no mocks.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import stat
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from mailrelay.config import parseConfig
from mailrelay.interfaces import AlreadyExists, LeaseLost, NotFound, StoreError
from mailrelay.model import (
    STATUS_TEXTS,
    Delivery,
    Notification,
    PendingReport,
    QueueStats,
    Recipient,
    StatusEvent,
)
from mailrelay.policy.limits import startOfDay
from mailrelay.store import makeStore
from mailrelay.store.sqlite import SQLiteStore, workerFile
from mailrelay.store.sqlite.bodies import messageBodies
from mailrelay.store.sqlite.delivery import _claimEntries, _claimOldestDue, _dueEntries
from mailrelay.store.sqlite.migrate import schemaScripts, statements
from mailrelay.store.sqlite.queue import _acceptedSince, _stats
from mailrelay.store.sqlite.statements import inChunks, insertRows, withList
from mailrelay.store.sqlite.threads import (
    Ahead,
    DatabaseThread,
    GroupCommitThread,
    InlineReader,
    InSequence,
    Work,
)
from mailrelay.store.sqlite.trails import _EXPIRE_START, _expireBatch
from tests.store_mixin import (
    ALICE,
    BOB,
    PHONE,
    T0,
    DeliveryQueueTestsMixin,
    GatewayIdsTestsMixin,
    RememberedAccountDataTestsMixin,
    ReportQueueTestsMixin,
    StoreHelpersMixin,
    StoreTestsMixin,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def databaseAtVersion(path: Path, version: int) -> sqlite3.Connection:
    """A new database file at ``path`` as schema ``version`` made it (the scripts up to that
    one, and its ``user_version``): an autocommit connection, to fill it with old rows."""
    connection = sqlite3.connect(path, isolation_level=None)
    for number, script in schemaScripts():
        if number > version:
            break
        for statement in statements(script):
            connection.execute(statement)
    connection.execute(f"PRAGMA user_version = {version:d}")
    return connection


class SQLiteStoreTestsBase(StoreHelpersMixin, TestCase):
    """Makes SQLite stores in files under the test's temp directory (``self.store``: one)."""

    def makeStore(self) -> Deferred[SQLiteStore]:
        return Deferred.fromCoroutine(self.openStore())

    def databasePath(self) -> Path:
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        return directory / "mailrelay.sqlite3"

    async def openStore(self, path: Path | None = None, **kwargs: Any) -> SQLiteStore:
        store = SQLiteStore(path or self.databasePath(), reactor, **kwargs)
        await store.open()
        self.addCleanup(store.close)
        return store

    async def bodyStored(self, notificationId: str) -> bool:
        for file in self.store.notificationFiles():
            connection = sqlite3.connect(file)
            try:
                row = connection.execute(
                    "SELECT 1 FROM messages WHERE notification_id = ?", (int(notificationId),)
                ).fetchone()
            finally:
                connection.close()
            if row is not None:
                return True
        return False


class SQLiteStoreTests(StoreTestsMixin, SQLiteStoreTestsBase):
    """The shared suite, against SQLite."""


class DurabilityTests(SQLiteStoreTestsBase):
    """Data written is on disk: it survives closing, reopening and a killed process."""

    async def test_reopen(self) -> None:
        path = self.databasePath()
        store = SQLiteStore(path, reactor)
        await store.open()
        self.store = store
        account = await store.addAccount("acme", "h")
        notification = await self.enqueued()
        await store.close()

        store = await self.openStore(path)
        self.assertEqual(await store.getAccount("acme"), account)
        self.assertEqual(await store.getNotification(notification.notification_id), notification)
        self.assertEqual(await store.stats(), QueueStats(queued=1, deferred=0, in_flight=0))

    async def test_fileSettings(self) -> None:
        path = self.databasePath()
        await self.openStore(path)
        connection = sqlite3.connect(path)
        try:
            self.assertEqual(connection.execute("PRAGMA journal_mode").fetchone(), ("wal",))
            version = connection.execute("PRAGMA user_version").fetchone()[0]
        finally:
            connection.close()
        self.assertEqual(version, schemaScripts()[-1][0])

    def test_crashAfterEnqueue(self, *asWorker: str) -> Deferred[None]:
        """
        A process that was told its enqueues succeeded is killed at once (SIGKILL: no cleanup,
        no close); the notifications are there when the store is opened again, the one with a
        body in its row and the one with a body in a segment file alike.
        """
        path = self.databasePath()
        printed: Deferred[str] = Deferred()
        ended: Deferred[BaseException] = Deferred()
        child = _LineThenEnd(printed, ended)
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        process = reactor.spawnProcess(
            child,
            sys.executable,
            [sys.executable, "-c", CRASH_SCRIPT, str(path), *asWorker],
            env=env,
        )
        timeout = reactor.callLater(30, process.signalProcess, "KILL")

        async def check() -> None:
            small, large = (await printed).split()
            os.kill(process.pid, signal.SIGKILL)
            reason = await ended
            timeout.cancel()
            assert isinstance(reason, ProcessTerminated)
            self.assertEqual(reason.signal, signal.SIGKILL)

            store = await self.openStore(path)
            notification = await store.getNotification(small)
            self.assertIsNotNone(notification)
            self.assertEqual(notification.recipients, (ALICE,))
            self.assertEqual(await store.stats(), QueueStats(queued=2, deferred=0, in_flight=0))
            entries = {e.notification.notification_id: e for e in await store.claimDue(10, 60)}
            self.assertEqual(entries[small].message, b"Subject: crash\r\n\r\nbody\r\n")
            self.assertEqual(entries[large].message, CRASH_LARGE_BODY)

        return Deferred.fromCoroutine(check())

    def test_crashAfterEnqueueInAWorkersFile(self) -> Deferred[None]:
        """The same for a worker, which writes to its own file; the main process finds it."""
        return self.test_crashAfterEnqueue("worker")


CRASH_LARGE_BODY = b"Subject: large\r\n\r\n" + b"0123456789\r\n" * 10000  # as the script's
CRASH_SCRIPT = """
import dataclasses
import sys
from datetime import UTC, datetime
from pathlib import Path
from twisted.internet import defer, task
from mailrelay.model import Notification, Recipient
from mailrelay.store.sqlite import SQLiteStore, workerFile

async def main(reactor):
    main = Path(sys.argv[1])
    if len(sys.argv) > 2:  # as worker 1, once the main process made the main file
        await SQLiteStore(main, reactor).open()
        store = SQLiteStore(main, reactor, instanceId=1, home=workerFile(main, 1))
    else:
        store = SQLiteStore(main, reactor)
    await store.open()
    notification = Notification(
        notification_id=store.nextNotificationId(), account="acme", sender="a@acme.example",
        recipients=(Recipient("name1@customer.com", "email"),), size=24,
        received_at=datetime.now(UTC))
    await store.enqueue(notification, b"Subject: crash\\r\\n\\r\\nbody\\r\\n")
    large = dataclasses.replace(notification, notification_id=store.nextNotificationId())
    await store.enqueue(large, b"Subject: large\\r\\n\\r\\n" + b"0123456789\\r\\n" * 10000)
    print(notification.notification_id, large.notification_id, flush=True)
    await defer.Deferred()  # wait to be killed

task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
"""


class _LineThenEnd(ProcessProtocol):
    """
    Fires ``printed`` with the child's first line of output, ``ended`` with the reason (an
    exception) when it is gone.
    """

    def __init__(self, printed: Deferred[str], ended: Deferred[BaseException]) -> None:
        self.printed = printed
        self.ended = ended
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"\n" in self.output and not self.printed.called:
            self.printed.callback(self.output.split(b"\n")[0].decode().strip())

    def errReceived(self, data: bytes) -> None:
        sys.stderr.write(data.decode(errors="replace"))

    def processEnded(self, reason: Failure) -> None:
        if not self.printed.called:
            self.printed.errback(reason)
        self.ended.callback(reason.value)


class GroupCommitTests(SQLiteStoreTestsBase):
    """Concurrent writes share commits, and a bad write fails alone."""

    async def test_concurrentEnqueuesShareCommits(self) -> None:
        before = self.store.commits
        notifications = [self.notification() for _ in range(50)]
        await gatherResults([self.store.enqueue(n, b"body") for n in notifications])
        commits = self.store.commits - before
        self.assertLess(commits, 50)
        self.assertGreaterEqual(commits, 1)
        self.assertEqual((await self.store.stats()).queued, 50)
        for n in notifications:
            self.assertEqual(await self.store.getNotification(n.notification_id), n)

    async def test_badRequestFailsAlone(self) -> None:
        duplicate = await self.enqueued()
        before = self.store.commits
        good = [self.notification() for _ in range(10)]
        results = [self.store.enqueue(n, b"body") for n in good[:5]]
        bad = self.store.enqueue(duplicate, b"again")
        results += [self.store.enqueue(n, b"body") for n in good[5:]]
        await gatherResults(results)
        with self.assertRaises(AlreadyExists):
            await bad
        self.assertLess(self.store.commits - before, 11)
        self.assertEqual((await self.store.stats()).queued, 11)
        self.assertEqual(len(await self.store.statusTrail(duplicate.notification_id)), 2)

    async def test_closeFinishesPendingWrites(self) -> None:
        path = self.store.path
        notifications = [self.notification() for _ in range(20)]
        writes = [self.store.enqueue(n, b"body") for n in notifications]
        await self.store.close()
        await gatherResults(writes)
        store = await self.openStore(path)
        self.assertEqual((await store.stats()).queued, 20)


class FailureTests(SQLiteStoreTestsBase):
    """Every failure is a StoreError; the raw sqlite3 exception is only its cause."""

    async def assertStoreError(self, d: Deferred[Any]) -> StoreError:
        try:
            await d
        except StoreError as e:
            self.assertNotIsInstance(e, sqlite3.Error)
            return e
        self.fail("no StoreError")

    async def test_garbageFile(self) -> None:
        path = self.databasePath()
        path.write_bytes(b"this is not a database, just some bytes " * 200)
        store = SQLiteStore(path, reactor)
        error = await self.assertStoreError(store.open())
        self.assertIsInstance(error.__cause__, sqlite3.DatabaseError)
        await self.assertStoreError(store.getAccount("acme"))
        await self.assertStoreError(store.addAccount("acme", "h"))
        await store.close()

    async def test_missingDirectory(self) -> None:
        path = self.databasePath().parent / "missing" / "db.sqlite3"
        await self.assertStoreError(SQLiteStore(path, reactor).open())

    async def test_pathIsADirectory(self) -> None:
        path = self.databasePath()
        path.mkdir()
        await self.assertStoreError(SQLiteStore(path, reactor).open())

    async def test_newerSchema(self) -> None:
        path = self.databasePath()
        connection = sqlite3.connect(path)
        connection.execute("PRAGMA user_version = 999")
        connection.close()
        error = await self.assertStoreError(SQLiteStore(path, reactor).open())
        self.assertIn("newer", str(error))

    async def test_notOpenOrClosed(self) -> None:
        store = SQLiteStore(self.databasePath(), reactor)
        await self.assertStoreError(store.getAccount("acme"))
        await store.open()
        await store.close()
        await self.assertStoreError(store.addAccount("acme", "h"))
        await self.assertStoreError(store.stats())

    async def test_claimTheStoreCannotMakeFails(self) -> None:
        """A claim the store cannot make fails with StoreError, so that the delivery loop
        reports the queue as unreadable (``/healthz``), rather than finding nothing due."""
        store = await self.openStore()
        await store.close()
        await self.assertStoreError(store.claimDue(10, leaseSeconds=60))

    async def test_lockedByAnotherProcess(self) -> None:
        """
        Another connection holds the write lock longer than the busy timeout: each write fails
        with StoreError (the group is retried one by one), and the store recovers afterwards.
        """
        store = await self.openStore(busyTimeout=0.05)
        blocker = sqlite3.connect(store.path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            writes = [store.addAccount(name, "h") for name in ("a", "b", "c")]
            for write in writes:
                await self.assertStoreError(write)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        await store.addAccount("a", "h")
        self.assertEqual([a.name for a in await store.listAccounts()], ["a"])

    async def test_unstorableValues(self) -> None:
        notification = self.notification()
        huge = dataclasses.replace(notification, size=2**70)
        await self.assertStoreError(self.store.enqueue(huge, b"body"))
        badId = dataclasses.replace(notification, notification_id="x1")
        await self.assertStoreError(self.store.enqueue(badId, b"body"))
        self.assertEqual(await self.store.stats(), QueueStats(0, 0, 0))


class DeliveryQueueTests(DeliveryQueueTestsMixin, SQLiteStoreTestsBase):
    pass


class MakeStoreTests(TestCase):
    """makeStore picks the backend from the config."""

    def test_sqliteInDataDir(self) -> None:
        dataDir = Path(self.mktemp()) / "data"
        store = makeStore(parseConfig({"data_dir": str(dataDir)}), reactor)
        self.assertIsInstance(store, SQLiteStore)
        assert isinstance(store, SQLiteStore)
        self.assertEqual(store.path, dataDir / "mailrelay.sqlite3")
        self.assertEqual(stat.S_IMODE(dataDir.stat().st_mode), 0o700)

    def test_dataDirUncreatable(self) -> None:
        blocker = Path(self.mktemp())
        blocker.write_text("a file, not a directory")
        with self.assertRaises(StoreError):
            makeStore(parseConfig({"data_dir": str(blocker / "data")}), reactor)


class SchemaTests(TestCase):
    """The schema scripts ship as package data and split into statements."""

    def test_scripts(self) -> None:
        scripts = schemaScripts()
        self.assertEqual(scripts[0][0], 1)
        self.assertIn("CREATE TABLE notifications", scripts[0][1])

    def test_statements(self) -> None:
        script = "-- a comment\nCREATE TABLE a (x TEXT DEFAULT ';');\nCREATE TABLE b (y);\n-- end\n"
        self.assertEqual(
            list(statements(script)),
            ["-- a comment\nCREATE TABLE a (x TEXT DEFAULT ';');", "CREATE TABLE b (y);"],
        )

    def test_incompleteStatement(self) -> None:
        with self.assertRaises(StoreError):
            list(statements("CREATE TABLE a (x);\nCREATE TABLE b (\n"))

    def test_indexesAnEnqueueMaintains(self) -> None:
        """Every index on the tables an enqueue writes costs each commit a B-tree insert and a
        WAL page: only these, each needed by a query (bulk lookups, expiry, the bodies'
        segments, due work and the queue counts)."""
        connection = databaseAtVersion(Path(self.mktemp()), schemaScripts()[-1][0])
        self.addCleanup(connection.close)
        indexes = connection.execute(
            "SELECT tbl_name, name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
            "AND tbl_name IN ('notifications', 'messages', 'queue', 'daily_counts') "
            "ORDER BY tbl_name, name"
        ).fetchall()
        self.assertEqual(
            indexes,
            [
                ("messages", "messages_by_segment"),
                ("notifications", "notifications_by_bulk"),
                ("notifications", "notifications_by_time"),
                ("queue", "queue_by_state_due"),
            ],
        )

    def test_queueCountsReadTheIndex(self) -> None:
        """The queue counts (``/metrics``, ``queue stats``) read the index by state, much
        smaller to scan than the queue itself."""
        connection = databaseAtVersion(Path(self.mktemp()), schemaScripts()[-1][0])
        self.addCleanup(connection.close)
        queries: list[str] = []
        connection.set_trace_callback(queries.append)
        _stats(connection)
        connection.set_trace_callback(None)
        (query,) = queries
        plan = " / ".join(row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {query}"))
        self.assertIn("USING COVERING INDEX queue_by_state_due", plan)

    def test_timeQueriesUseAnIndex(self) -> None:
        """A count since a moment other than midnight and expiry find their rows through
        notifications_by_time, not by reading every notification."""
        connection = databaseAtVersion(Path(self.mktemp()), schemaScripts()[-1][0])
        self.addCleanup(connection.close)
        queries: list[str] = []
        connection.set_trace_callback(queries.append)
        _acceptedSince(connection, "acme", since=1_700_000_000_123)
        _expireBatch(connection, before=1_700_000_000_123, after=_EXPIRE_START, batch=500)
        connection.set_trace_callback(None)
        onNotifications = [q for q in queries if "FROM notifications" in q]
        self.assertEqual(len(onNotifications), 2)
        for query in onNotifications:
            plan = " / ".join(row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {query}"))
            self.assertIn("SEARCH notifications USING", plan)
            self.assertIn("INDEX notifications_by_time", plan)
            self.assertNotIn("TEMP B-TREE", plan)

    def test_dueWorkFoundThroughTheIndex(self) -> None:
        """With 20,000 entries queued but not due, a claim reads a range of the index by
        state and due time per state (empty here), in the index's order: no scan, no sort."""
        connection = databaseAtVersion(Path(self.mktemp()), schemaScripts()[-1][0])
        self.addCleanup(connection.close)
        later = 1_800_000_000_000
        connection.execute("BEGIN")
        for number in range(1, 20_001):
            connection.execute(
                "INSERT INTO notifications (id, account, sender, size, received_at, "
                "notify_content_type, recipient_list) VALUES (?, 'acme', 'a@acme.example', 1, "
                "?, 'text/plain', '[]')",
                (number, later),
            )
            connection.execute(
                "INSERT INTO queue (notification_id, state, next_attempt) VALUES (?, ?, ?)",
                (number, ("queued", "deferred")[number % 2], later + number),
            )
        connection.execute("COMMIT")
        connection.execute("ANALYZE")
        queries: list[str] = []
        connection.set_trace_callback(queries.append)
        self.assertEqual(_dueEntries(connection, limit=10, now=later), ([], []))
        connection.execute("BEGIN")
        self.assertEqual(_claimEntries(connection, [1, 2], now=later, leaseUntil=later), ([], []))
        connection.execute("ROLLBACK")
        connection.set_trace_callback(None)
        onQueue = [q for q in queries if "FROM queue" in q]
        self.assertEqual(len(onQueue), 2)  # the due entries of each state, then the claim's look
        plans = [
            " / ".join(row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {query}"))
            for query in onQueue
        ]
        for plan in plans:
            self.assertNotIn("SCAN queue", plan)
            self.assertNotIn("TEMP B-TREE", plan)
        self.assertEqual(
            plans[0].count(
                "SEARCH queue USING COVERING INDEX queue_by_state_due (state=? AND next_attempt<?)"
            ),
            3,
        )

    def test_claimInAFewStatements(self) -> None:
        """A claim of 32 entries runs the same few statements as a claim of two (a look at
        the entries, their bodies, the claim, their notifications, the started events), and
        gives each entry its own lease, in the order asked for."""
        connection = databaseAtVersion(Path(self.mktemp()), schemaScripts()[-1][0])
        self.addCleanup(connection.close)
        now = 1_800_000_000_000
        _queueEntries(connection, now, [(n, "queued", now - n) for n in range(1, 41)])

        def started(delivery: Delivery) -> tuple[tuple[StatusEvent, ...], tuple[()]]:
            sent = STATUS_TEXTS["CAAS_SENT"]
            at = datetime(2027, 1, 1, tzinfo=UTC)
            events = tuple(
                StatusEvent(delivery.notification.notification_id, r, "CAAS_SENT", sent, at)
                for r in delivery.pending
            )
            return events, ()

        statementCounts = []
        for numbers in ([2, 1], list(range(34, 2, -1))):
            queries: list[str] = []
            connection.set_trace_callback(queries.append)
            connection.execute("BEGIN")
            claimed, unreadable = _claimEntries(
                connection, numbers, now=now, leaseUntil=now + 60_000, firstAttempt=started
            )
            connection.execute("COMMIT")
            connection.set_trace_callback(None)
            statementCounts.append(len(queries))
            self.assertEqual(unreadable, [])
            self.assertEqual([int(d.notification.notification_id) for d in claimed], numbers)
            self.assertEqual([d.message for d in claimed], [b"m%d" % n for n in numbers])
            self.assertEqual({d.attempts for d in claimed}, {1})
            self.assertEqual(len({d.lease for d in claimed}), len(numbers))
        self.assertEqual(statementCounts[0], statementCounts[1])
        self.assertEqual(
            connection.execute(
                "SELECT COUNT(*), COUNT(DISTINCT lease) FROM queue WHERE state = 'in_flight'"
            ).fetchone(),
            (34, 34),
        )
        self.assertEqual(connection.execute("SELECT COUNT(*) FROM status_events").fetchone(), (68,))

    @settings(max_examples=100, deadline=None)
    @given(
        st.lists(
            st.one_of(st.binary(max_size=300), st.sampled_from([b"", b"\x00" * 9, b"\xff\xfe"]))
            | st.none(),
            max_size=40,
        )
    )
    def test_bodiesReadAsOne(self, bodies: list[bytes | None]) -> None:
        """The bodies read in one step are each row's bytes as stored, NULs and bytes that
        are no UTF-8 included; a body in a segment file (here one that is missing: None)
        takes no bytes of the others' and fails alone."""
        connection = databaseAtVersion(Path(self.mktemp()), schemaScripts()[-1][0])
        self.addCleanup(connection.close)
        _queueEntries(connection, 0, [(n, "queued", 0) for n in range(1, len(bodies) + 1)])
        for number, body in enumerate(bodies, 1):
            if body is None:  # in segment 7, which is not there
                connection.execute(
                    "UPDATE messages SET body = x'', body_segment = 7, body_offset = 0, "
                    "body_length = 3, body_crc = 0 WHERE notification_id = ?",
                    (number,),
                )
            else:
                connection.execute(
                    "UPDATE messages SET body = ? WHERE notification_id = ?", (body, number)
                )
        asked = [*range(len(bodies), 0, -1), len(bodies) + 1]  # the last one has no row
        read = messageBodies(connection, asked)
        self.assertEqual(set(read), set(range(1, len(bodies) + 1)))
        for number, body in enumerate(bodies, 1):
            if body is None:
                self.assertIsInstance(read[number], StoreError)
            else:
                self.assertEqual(read[number], body)

    def test_claimOldestDueInOneWrite(self) -> None:
        """A claim from one file reads its due entries and claims them in the same
        transaction: half the limit never tried and half retries (deferred, or in flight
        with a lapsed lease) while both last, oldest first; nothing held or due later."""
        connection = databaseAtVersion(Path(self.mktemp()), schemaScripts()[-1][0])
        self.addCleanup(connection.close)
        now = 1_800_000_000_000
        _queueEntries(
            connection,
            now,
            [
                *((n, "queued", now - 100 + n) for n in range(1, 11)),
                *((n, "deferred", now - 200 + n) for n in range(11, 21)),
                (21, "in_flight", now - 300),
                (22, "held", now - 400),
                (23, "queued", now + 1),
                (24, "deferred", now + 1),
            ],
        )
        claim = partial(_claimEntries, now=now, leaseUntil=now + 60_000)
        connection.execute("BEGIN")
        claimed, unreadable = _claimOldestDue(connection, limit=8, now=now, claim=claim)
        connection.execute("COMMIT")
        self.assertEqual(unreadable, [])
        self.assertEqual(
            [int(d.notification.notification_id) for d in claimed],
            [21, 11, 12, 13, 1, 2, 3, 4],
        )
        self.assertEqual(
            connection.execute(
                "SELECT notification_id FROM queue WHERE state = 'in_flight' "
                "AND next_attempt = ? ORDER BY notification_id",
                (now + 60_000,),
            ).fetchall(),
            [(n,) for n in (1, 2, 3, 4, 11, 12, 13, 21)],
        )


def _queueEntries(
    connection: sqlite3.Connection, now: int, entries: Sequence[tuple[int, str, int]]
) -> None:
    """Notifications of two recipients with their bodies (``m<number>``) and queue entries,
    each ``(number, state, next_attempt)``, received at ``now``."""
    recipients = '[["a@x.example", "email"], ["b@x.example", "email"]]'
    connection.execute("BEGIN")
    for number, state, nextAttempt in entries:
        connection.execute(
            "INSERT INTO notifications (id, account, sender, size, received_at, "
            "notify_content_type, recipient_list) VALUES (?, 'acme', 's@acme.example', 4, "
            "?, 'text/plain', ?)",
            (number, now, recipients),
        )
        connection.execute(
            "INSERT INTO messages (notification_id, body) VALUES (?, ?)",
            (number, b"m%d" % number),
        )
        connection.execute(
            "INSERT INTO queue (notification_id, state, next_attempt) VALUES (?, ?, ?)",
            (number, state, nextAttempt),
        )
    connection.execute("COMMIT")


class AccountDataRememberedTests(RememberedAccountDataTestsMixin, SQLiteStoreTestsBase):
    async def openSharing(self) -> SQLiteStore:
        return await self.openStore(self.store.path)


class InlineReadsStoreTests(StoreTestsMixin, SQLiteStoreTestsBase):
    """The shared suite, against a store that reads on the reactor thread, as the web process's
    does (the writes still go to the writer thread)."""

    def makeStore(self) -> Deferred[SQLiteStore]:
        return Deferred.fromCoroutine(self.openStore(inlineReads=True))


class InlineReaderTests(TestCase):
    """The web process's reader: each read runs when asked, on the calling thread."""

    def setUp(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        self.main, self.other = directory / "a.sqlite3", directory / "b.sqlite3"
        for path in (self.main, self.other):
            sqlite3.connect(path).close()
        self.files = [self.main, self.other]
        self.reader = InlineReader(
            "test-inline",
            lambda p: sqlite3.connect(p, isolation_level=None),
            reactor,
            self.main,
            lambda: self.files,
        )
        self.addCleanup(self.reader.stop)

    def test_answeredAtOnceOnTheCallingThread(self) -> None:
        self.successResultOf(self.reader.start())
        threads: list[str] = []

        def read(connection: sqlite3.Connection) -> int:
            threads.append(threading.current_thread().name)
            return int(connection.execute("SELECT 7").fetchone()[0])

        self.assertEqual(self.successResultOf(self.reader.submit(read)), 7)
        each = self.successResultOf(self.reader.submitEach(read))
        self.assertEqual(each, [(self.main, 7), (self.other, 7)])
        self.assertEqual(set(threads), {threading.current_thread().name})

    def test_failuresAreStoreErrors(self) -> None:
        self.successResultOf(self.reader.start())
        failed = self.failureResultOf(
            self.reader.submit(lambda c: c.execute("SELECT * FROM nowhere")), StoreError
        )
        self.assertIsInstance(failed.value.__cause__, sqlite3.OperationalError)
        self.flushLoggedErrors()
        self.successResultOf(self.reader.stop())
        self.failureResultOf(self.reader.submit(lambda c: 1), StoreError)

    def test_homeThatCannotBeOpened(self) -> None:
        reader = InlineReader("test-inline", _cannotConnect, reactor, self.main, lambda: [])
        self.failureResultOf(reader.start(), StoreError)
        self.failureResultOf(reader.submit(lambda c: 1), StoreError)


def _cannotConnect(path: Path) -> sqlite3.Connection:
    raise sqlite3.OperationalError(f"unable to open database file {path}")


class WorkerFileTestsBase(SQLiteStoreTestsBase):
    """``self.store`` is worker 1's store, as ``workers = 2`` makes it: the main process's
    store (``self.main``) made the main file, the worker writes its own file beside it."""

    async def openWorker(self, main: SQLiteStore, index: int) -> SQLiteStore:
        return await self.openStore(main.path, instanceId=index, home=workerFile(main.path, index))

    def makeStore(self) -> Deferred[SQLiteStore]:
        async def make() -> SQLiteStore:
            self.main = await self.openStore()
            return await self.openWorker(self.main, 1)

        return Deferred.fromCoroutine(make())


class WorkerFileStoreTests(StoreTestsMixin, WorkerFileTestsBase):
    """The shared suite, against a worker's store: the accounts are in the main file, the
    notifications in the worker's."""


class WorkerFileDeliveryQueueTests(DeliveryQueueTestsMixin, WorkerFileTestsBase):
    pass


class WorkerFilesTests(WorkerFileTestsBase):
    """Each worker writes the notifications it accepts to its own file; every process reads
    (and a delivery worker updates) all of them."""

    def idsIn(self, path: Path) -> set[str]:
        database = sqlite3.connect(path)
        try:
            return {str(n) for (n,) in database.execute("SELECT id FROM notifications")}
        finally:
            database.close()

    async def test_enqueueGoesToTheWorkersFile(self) -> None:
        notification = await self.enqueued()
        nid = notification.notification_id
        self.assertEqual(self.idsIn(workerFile(self.main.path, 1)), {nid})
        self.assertEqual(self.idsIn(self.main.path), set())
        # The main process (the status API) finds it, and so does the admin command.
        self.assertEqual(await self.main.getNotification(nid), notification)
        self.assertEqual(len(await self.main.statusTrail(nid)), 2)
        self.assertEqual(await self.main.stats(), QueueStats(1, 0, 0))
        self.assertEqual(await self.main.acceptedSince("acme", T0), 1)

    async def test_workerFilesListedAgainOnlyWhenTheDirectoryChanges(self) -> None:
        """The listing of the workers' files is kept while the directory is unchanged (a
        claim and every read of each file ask for it), and made again once it changes."""
        directory = self.main.path.parent
        worker1 = workerFile(self.main.path, 1)
        self.assertEqual(self.main.notificationFiles(), [self.main.path, worker1])
        still = os.stat(directory).st_mtime_ns - 10_000_000_000
        os.utime(directory, ns=(still, still))
        self.assertEqual(self.main.notificationFiles(), [self.main.path, worker1])  # kept
        # A file made while the directory's time is put back: not seen, the listing was kept.
        unseen = workerFile(self.main.path, 7)
        unseen.touch()
        os.utime(directory, ns=(still, still))
        self.assertEqual(self.main.notificationFiles(), [self.main.path, worker1])
        # A file made as usual changes the directory's time: listed at once.
        await self.openWorker(self.main, 2)
        self.assertEqual(
            self.main.notificationFiles(),
            [self.main.path, worker1, workerFile(self.main.path, 2), unseen],
        )

    async def test_workersWriteAtOnce(self) -> None:
        """Three processes' stores write at the same time, each to its file, each file with
        its own commits; every store sees all of it."""
        second = await self.openWorker(self.main, 2)
        stores = [self.main, self.store, second]
        notifications: list[tuple[SQLiteStore, Notification]] = []
        for store in stores * 100:
            self.store = store
            notifications.append((store, self.notification()))
        before = [store.commits for store in stores]
        await gatherResults([store.enqueue(n, b"body") for store, n in notifications])
        for store, commits in zip(stores, before, strict=True):
            self.assertGreaterEqual(store.commits - commits, 1)
            self.assertLess(store.commits - commits, 100)  # grouped
        for store in stores:
            self.assertEqual(await store.stats(), QueueStats(300, 0, 0))
        files = [self.main.path, workerFile(self.main.path, 1), workerFile(self.main.path, 2)]
        for store, file in zip(stores, files, strict=True):
            self.assertEqual(
                self.idsIn(file), {n.notification_id for s, n in notifications if s is store}
            )
        for _, notification in notifications[::23]:
            found = await second.getNotification(notification.notification_id)
            self.assertEqual(found, notification)

    async def test_bulkAcrossFiles(self) -> None:
        other = self.store
        self.store = self.main
        second = await self.enqueued(bulkId="b1", receivedAt=T0 + timedelta(seconds=2))
        self.store = other
        first = await self.enqueued(bulkId="b1", receivedAt=T0)
        third = await self.enqueued(bulkId="b1", receivedAt=T0 + timedelta(seconds=3))
        expected = [n.notification_id for n in (first, second, third)]
        self.assertEqual(await self.main.notificationsForBulk("acme", "b1"), expected)
        self.assertEqual(await self.store.notificationsForBulk("acme", "b1"), expected)

    async def test_deliveryAcrossFiles(self) -> None:
        """The main process's store claims the oldest due entries of every file, and
        records outcomes for a notification wherever it is; so does another process's store
        that did not claim it (the admin command)."""
        worker = self.store
        inWorker = await self.enqueued(receivedAt=T0)
        self.store = self.main
        inMain = await self.enqueued(receivedAt=T0 + timedelta(seconds=1))
        self.store = worker
        laterInWorker = await self.enqueued(receivedAt=T0 + timedelta(seconds=2))
        claimed = await self.main.claimDue(2, leaseSeconds=60)
        self.assertEqual([d.notification for d in claimed], [inWorker, inMain])
        self.assertEqual(await self.main.stats(), QueueStats(1, 0, 2))
        first, second = claimed
        await self.main.recordOutcome(
            inWorker.notification_id, first.lease, [], inWorker.recipients, None
        )
        await self.main.recordOutcome(inMain.notification_id, second.lease, [], [ALICE], T0)
        (delivery,) = await self.main.claimDue(1, leaseSeconds=60)
        self.assertEqual((delivery.notification, delivery.attempts), (inMain, 2))
        self.assertEqual(delivery.pending, (PHONE,))
        (delivery,) = await self.main.claimDue(1, leaseSeconds=60)
        self.assertEqual(delivery.notification, laterInWorker)
        admin = await self.openStore(self.main.path)
        await admin.renewLease(laterInWorker.notification_id, delivery.lease, 60)
        self.assertEqual(await admin.hold(None, "acme"), 0)
        await admin.releaseLease(laterInWorker.notification_id, delivery.lease)
        self.assertEqual(await self.main.stats(), QueueStats(0, 0, 1, held=1))
        self.assertEqual(await admin.release(None, None), 1)
        failed = await admin.deleteQueued(laterInWorker.notification_id, "gone", T0)
        self.assertEqual(failed, list(laterInWorker.recipients))
        with self.assertRaises(LeaseLost):
            await self.main.renewLease(inWorker.notification_id, first.lease, 60)
        with self.assertRaises(StoreError):
            await self.main.renewLease("not an id", first.lease, 60)

    async def test_eachProcessClaimsWhatItAccepted(self) -> None:
        """With ``workers = 2`` each process delivers from its own file: worker 1 claims only
        what it accepted, the main process its own and that of a worker no longer running
        (worker 2's file, left from when ``workers`` was 3), never worker 1's."""
        main = await self.openStore(self.main.path, deliveringWorkers=1)
        worker = self.store
        gone = await self.openWorker(self.main, 2)
        accepted: dict[str, str] = {}
        for name, store in (("worker", worker), ("main", main), ("gone", gone)):
            self.store = store
            for second in range(3):
                notification = await self.enqueued(receivedAt=T0 + timedelta(seconds=second))
                accepted[notification.notification_id] = name
        await gone.close()

        byMain = {d.notification.notification_id for d in await main.claimDue(50, 60)}
        byWorker = {d.notification.notification_id for d in await worker.claimDue(50, 60)}
        self.assertEqual({accepted[nid] for nid in byMain}, {"main", "gone"})
        self.assertEqual(len(byMain), 6)
        self.assertEqual({accepted[nid] for nid in byWorker}, {"worker"})
        self.assertEqual(len(byWorker), 3)
        # The admin command's store (deliveringWorkers = 0) would see every file.
        self.assertEqual(await main.stats(), QueueStats(0, 0, 9))

    async def test_eventsAcrossFiles(self) -> None:
        """Events for notifications in two files are stored in each one's file; with an
        unknown notification among them, none is stored."""
        inWorker = await self.enqueued(recipients=(ALICE,))
        self.store = self.main
        inMain = await self.enqueued(recipients=(ALICE,))
        events = [
            StatusEvent(n.notification_id, ALICE, "CH_SENT", "Successful", T0 + timedelta(1))
            for n in (inWorker, inMain)
        ]
        unknown = StatusEvent(self.main.nextNotificationId(), ALICE, "CH_SENT", "Successful", T0)
        with self.assertRaises(NotFound):
            await self.main.addEvents([*events, unknown])
        self.assertEqual(len(await self.main.statusTrail(inWorker.notification_id)), 1)
        await self.main.addEvents(events)
        for notification in (inWorker, inMain):
            trail = await self.main.statusTrail(notification.notification_id)
            self.assertEqual([e.status_code for e in trail], ["CAAS_RECEIVED", "CH_SENT"])

    async def test_writesOnlyWhereTheWorkIs(self) -> None:
        """The report outbox claims and records, and an SMS receipt settles its gateway id,
        only in the files that hold them: a worker busy writing its file (its write lock
        held) holds up none of them, so the main process's writer, which they share with its
        deliveries, never waits behind it."""
        main = await self.openStore(self.main.path, busyTimeout=0.2)
        self.store = main
        inMain = await self.enqueued(recipients=(ALICE,))
        report = PendingReport(
            "r1", inMain.notification_id, "acme", "https://app.example/dlr",
            "application/json", "delivery", "{}", T0,
        )  # fmt: skip
        await main.addEventsWithReports([], [report])
        busy = sqlite3.connect(workerFile(main.path, 1), isolation_level=None)
        self.addCleanup(busy.close)
        busy.execute("BEGIN IMMEDIATE")  # the worker, in the middle of a write
        (claimed,) = await main.claimReports(10, 60)
        self.assertEqual(claimed.report.report_id, "r1")
        claims = [(claimed.report.report_id, claimed.lease)]
        self.assertEqual(await main.recordReportAttempt(claims, None, T0), 1)
        until = datetime.now(UTC) + timedelta(days=1)
        await main.rememberGatewayIds(inMain.notification_id, ALICE, ["g1"], until)
        self.assertTrue(await main.settleGatewayId("g1"))
        busy.execute("COMMIT")

    async def test_aWriteWaitingForAWorkersLockHoldsUpNoOtherWrite(self) -> None:
        """The main process's write to a busy worker's file (its report outbox's claim)
        waits for the worker's lock on a thread of its own: the main process's own writes
        (an enqueue) go on meanwhile."""
        report = PendingReport(
            "w1", (await self.enqueued()).notification_id, "acme",
            "https://app.example/dlr", "application/json", "delivery", "{}", T0,
        )  # fmt: skip
        await self.store.addEventsWithReports([], [report])  # in the worker's file
        main = await self.openStore(self.main.path, busyTimeout=5.0, deliveringWorkers=1)
        busy = sqlite3.connect(workerFile(main.path, 1), isolation_level=None)
        self.addCleanup(busy.close)
        busy.execute("BEGIN IMMEDIATE")
        claim = main.claimReports(10, 60)
        await deferLater(reactor, 0.2)  # the claim's write is waiting for the lock by now
        self.store = main
        await self.enqueued()  # the main file's write, while the claim waits
        self.assertNoResult(claim)
        busy.execute("COMMIT")
        (claimed,) = await claim
        self.assertEqual(claimed.report.report_id, "w1")

    async def test_expireAcrossFiles(self) -> None:
        worker = self.store
        for store in (self.main, worker):
            self.store = store
            await self.finishDelivery((await self.enqueued(receivedAt=T0)).notification_id)
        self.assertEqual(await self.main.expire(T0 + timedelta(days=1)), 2)
        self.assertEqual(await self.main.stats(), QueueStats(0, 0, 0))

    async def test_accountChangesGoToTheMainFile(self) -> None:
        """A worker's store writes account data to the main file, in the same writer as its
        enqueues."""
        writes = [self.store.enqueue(self.notification(), b"body") for _ in range(5)]
        writes.append(self.store.addAccount("zed", "hash"))
        writes += [self.store.enqueue(self.notification(), b"body") for _ in range(5)]
        await gatherResults(writes)
        self.assertEqual((await self.main.getAccount("zed")).name, "zed")  # type: ignore[union-attr]
        self.assertEqual(len(self.idsIn(workerFile(self.main.path, 1))), 10)

    async def test_unfinishedWorkerFileSkipped(self) -> None:
        """A worker's file that exists but has no schema yet (it is being made) is left out
        of reads until it has one; names that are not a worker's file are ignored."""
        directory = self.main.path.parent
        (directory / "mailrelay.worker-7.sqlite3").touch()
        (directory / "mailrelay.worker-x.sqlite3").write_text("not a database")
        (directory / "mailrelay.worker-1.sqlite3-wal.sqlite3.bak").touch()
        self.assertEqual(
            self.main.notificationFiles(),
            [
                self.main.path,
                workerFile(self.main.path, 1),
                workerFile(self.main.path, 7),
            ],
        )
        await self.enqueued()
        self.assertEqual(await self.main.stats(), QueueStats(1, 0, 0))
        seventh = await self.openWorker(self.main, 7)
        self.store = seventh
        await self.enqueued()
        self.assertEqual(await self.main.stats(), QueueStats(2, 0, 0))

    async def test_readerNeverCreatesAFile(self) -> None:
        """A store whose main file is missing fails to open, and creates nothing."""
        directory = Path(self.mktemp())
        directory.mkdir()
        main = directory / "mailrelay.sqlite3"
        store = SQLiteStore(main, reactor, instanceId=1, home=workerFile(main, 1))
        with self.assertRaises(StoreError):
            await store.open()
        self.assertFalse(main.exists())


class WorkerFileFailureTests(WorkerFileTestsBase):
    """A worker's file that is locked or broken costs what touches it, not the rest."""

    async def makeStoresWithAShortBusyTimeout(self) -> tuple[SQLiteStore, SQLiteStore]:
        main = await self.openStore(busyTimeout=0.05)
        worker = await self.openStore(
            main.path, instanceId=1, home=workerFile(main.path, 1), busyTimeout=0.05
        )
        return main, worker

    def lockWriting(self, path: Path) -> Callable[[], None]:
        """Hold ``path``'s write lock (as another process's writer would) until the returned
        function is called, or the test ends."""
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")

        def release() -> None:
            if released:
                return
            released.append(True)
            blocker.execute("ROLLBACK")
            blocker.close()

        released: list[bool] = []
        self.addCleanup(release)
        return release

    async def test_deliveryUpdatesWriteOnlyTheNotificationsFile(self) -> None:
        main, worker = await self.makeStoresWithAShortBusyTimeout()
        self.store = main
        inMain = await self.enqueued(receivedAt=T0)
        self.store = worker
        await self.enqueued(receivedAt=T0)
        claimed = await main.claimDue(2, leaseSeconds=60)
        (delivery,) = [d for d in claimed if d.notification == inMain]
        self.lockWriting(workerFile(main.path, 1))
        await main.recordOutcome(inMain.notification_id, delivery.lease, [], [ALICE], T0)
        (delivery,) = await main.claimDue(10, leaseSeconds=60)
        await main.recordOutcome(inMain.notification_id, delivery.lease, [], [PHONE], None)
        with self.assertRaises(LeaseLost):
            await main.releaseLease(inMain.notification_id, delivery.lease)

    async def test_claimGivesWhatTheOtherFilesGave(self) -> None:
        """A file whose write fails is left for the next claim; what the others gave is
        claimed and handed out, not left in flight."""
        main, worker = await self.makeStoresWithAShortBusyTimeout()
        self.store = main
        inMain = await self.enqueued(receivedAt=T0)
        self.store = worker
        inWorker = await self.enqueued(receivedAt=T0 - timedelta(seconds=1))
        release = self.lockWriting(workerFile(main.path, 1))
        (delivery,) = await main.claimDue(10, leaseSeconds=60)
        self.assertEqual(delivery.notification, inMain)
        self.assertEqual(await main.stats(), QueueStats(1, 0, 1))  # the worker's still queued
        release()
        (delivery,) = await main.claimDue(10, leaseSeconds=60)
        self.assertEqual(delivery.notification, inWorker)

    async def test_oldWorkerFileUpgradedWhenTheMainStoreOpens(self) -> None:
        """A worker's file made by an older mailrelay (a worker no longer configured, or one
        not restarted yet) is brought to this schema before anything reads it."""
        directory = Path(self.mktemp())
        directory.mkdir()
        main = directory / "mailrelay.sqlite3"
        databaseAtVersion(workerFile(main, 3), 1).close()
        store = await self.openStore(main)
        self.assertEqual(await store.acceptedSince("acme", startOfDay(T0)), 0)
        check = sqlite3.connect(workerFile(main, 3))
        self.addCleanup(check.close)
        latest = schemaScripts()[-1][0]
        self.assertEqual(check.execute("PRAGMA user_version").fetchone(), (latest,))

    async def test_brokenWorkerFileFailsThePing(self) -> None:
        """An unreadable worker file fails the reads that need it, and the store's ping
        (``/healthz``) says so instead of calling the store healthy."""
        workerFile(self.main.path, 4).write_bytes(b"not a database " * 300)
        with self.assertRaises(StoreError):
            await self.main.ping()
        with self.assertRaises(StoreError):
            await self.main.stats()

    async def test_expireForgetsOldDailyCounts(self) -> None:
        for store in (self.main, self.store):
            self.store = store
            await self.finishDelivery((await self.enqueued(receivedAt=T0)).notification_id)
        midnight = startOfDay(T0)
        self.assertEqual(await self.main.acceptedSince("acme", midnight), 2)
        await self.main.expire(midnight + timedelta(days=1))
        self.assertEqual(await self.main.acceptedSince("acme", midnight), 0)


class UpgradeTests(SQLiteStoreTestsBase):
    """A database made by an older mailrelay is brought up to date when the store opens."""

    async def test_dailyCountsFromTheMessagesAlreadyThere(self) -> None:
        path = self.databasePath()
        old = databaseAtVersion(path, 1)
        midnight = int(startOfDay(T0).timestamp() * 1000)
        rows = [
            (1, "acme", midnight - 1),
            (2, "acme", midnight),
            (3, "acme", midnight + 3_600_000),
            (4, "other", midnight + 1),
        ]
        old.executemany(
            "INSERT INTO notifications (id, account, sender, size, received_at, "
            "notify_content_type) VALUES (?, ?, 'a@acme.example', 1, ?, 'application/json')",
            rows,
        )
        old.close()
        store = self.store = await self.openStore(path)
        self.assertEqual(await store.acceptedSince("acme", startOfDay(T0)), 2)
        self.assertEqual(await store.acceptedSince("other", startOfDay(T0)), 1)
        await self.enqueued(receivedAt=T0)  # counted on top of what was there
        self.assertEqual(await store.acceptedSince("acme", startOfDay(T0)), 3)
        check = sqlite3.connect(path)
        self.addCleanup(check.close)
        latest = schemaScripts()[-1][0]
        self.assertEqual(check.execute("PRAGMA user_version").fetchone(), (latest,))

    async def test_notificationsFromBeforeRecipientLists(self) -> None:
        """Rows written by schema version 3 (a row per recipient and per CAAS_RECEIVED event)
        read as they did; new notifications beside them use the recipient list."""
        path = self.databasePath()
        old = databaseAtVersion(path, 3)
        received = int(T0.timestamp() * 1000)
        old.execute(
            "INSERT INTO notifications (id, account, sender, size, received_at, "
            "notify_content_type) VALUES (7, 'acme', 'app@acme.example', 1234, ?, "
            "'application/json')",
            (received,),
        )
        old.executemany(  # inserted out of RCPT order: position decides
            "INSERT INTO recipients (notification_id, position, address, channel) "
            "VALUES (7, ?, ?, ?)",
            [(1, PHONE.address, PHONE.channel), (0, ALICE.address, ALICE.channel)],
        )
        old.executemany(
            "INSERT INTO status_events (notification_id, address, channel, status_code, "
            "status_text, ts) VALUES (7, ?, ?, ?, 'Successful', ?)",
            [
                (ALICE.address, ALICE.channel, "CAAS_RECEIVED", received),
                (PHONE.address, PHONE.channel, "CAAS_RECEIVED", received),
                (PHONE.address, PHONE.channel, "CAAS_SENT", received + 5),
            ],
        )
        old.close()
        store = self.store = await self.openStore(path)
        loaded = await store.getNotification("7")
        assert loaded is not None
        self.assertEqual(loaded.recipients, (ALICE, PHONE))
        trail = await store.statusTrail("7")
        self.assertEqual(
            [(e.recipient, e.status_code) for e in trail],
            [(ALICE, "CAAS_RECEIVED"), (PHONE, "CAAS_RECEIVED"), (PHONE, "CAAS_SENT")],
        )
        new = await self.enqueued()
        self.assertEqual(await store.getNotification(new.notification_id), new)
        self.assertEqual(len(await store.statusTrail(new.notification_id)), 2)

    async def test_queueFromBeforeLeases(self) -> None:
        """The queue of schema version 7 is rebuilt with its rows (every recipient pending, no
        lease), and takes the new state; the accounts get bounces on."""
        path = self.databasePath()
        old = databaseAtVersion(path, 7)
        received = int(T0.timestamp() * 1000)
        rows = [
            (7, "queued", received, 0),
            (8, "deferred", received + 5, 2),
            (9, "in_flight", 1, 1),
        ]
        for number, state, nextAttempt, attempts in rows:
            old.execute(
                "INSERT INTO notifications (id, account, sender, size, received_at, "
                "notify_content_type, recipient_list) VALUES (?, 'acme', 'a@acme.example', 1, "
                "?, 'text/plain', ?)",
                (number, received, '[["name1@customer.com","email"],["+4477331234567","sms"]]'),
            )
            old.execute(
                "INSERT INTO messages (notification_id, body) VALUES (?, ?)", (number, b"body")
            )
            old.execute(
                "INSERT INTO queue (notification_id, state, next_attempt, attempts) "
                "VALUES (?, ?, ?, ?)",
                (number, state, nextAttempt, attempts),
            )
        old.execute("INSERT INTO accounts (name, password_hash) VALUES ('acme', 'h')")
        old.close()
        store = self.store = await self.openStore(path)
        self.assertEqual(await store.stats(), QueueStats(1, 1, 1))
        items = await store.queueItems(None, None, 10)
        self.assertEqual(
            [(i.notification_id, i.state, i.attempts, i.pending) for i in items],
            [
                ("9", "in_flight", 1, (ALICE, PHONE)),
                ("7", "queued", 0, (ALICE, PHONE)),
                ("8", "deferred", 2, (ALICE, PHONE)),
            ],
        )
        self.assertEqual(await store.hold("8", None), 1)
        self.assertEqual(await store.stats(), QueueStats(1, 0, 1, held=1))
        claimed = await store.claimDue(10, leaseSeconds=60)
        self.assertEqual(
            [(d.notification.notification_id, d.attempts) for d in claimed], [("9", 2), ("7", 1)]
        )
        self.assertTrue((await store.getAccount("acme")).bounces)  # type: ignore[union-attr]


class ExpiryTests(SQLiteStoreTestsBase):
    """Expiry writes a batch at a time and pages past the notifications it keeps."""

    async def test_expireInBatches(self) -> None:
        self.store.expireBatch = 3
        kept, gone = [], []
        for i in range(10):
            notification = await self.enqueued(receivedAt=T0 + timedelta(seconds=i // 2))
            (kept if i % 3 == 0 else gone).append(notification)
        for notification in gone:
            await self.finishDelivery(notification.notification_id)
        await self.store.hold(kept[0].notification_id, None)
        before = self.store.commits
        self.assertEqual(await self.store.expire(T0 + timedelta(days=1)), len(gone))
        self.assertGreaterEqual(self.store.commits - before, 4)  # batches of 3, then the rest
        for notification in gone:
            self.assertIsNone(await self.store.getNotification(notification.notification_id))
        for notification in kept:
            self.assertIsNotNone(await self.store.getNotification(notification.notification_id))
        self.assertEqual(await self.store.expire(T0 + timedelta(days=1)), 0)


class CompactIntakeTests(SQLiteStoreTestsBase):
    """
    An accepted message is three rows whatever its recipients: the notification (with its
    recipients, which imply its CAAS_RECEIVED events), the body and the queue entry.
    """

    def count(self, table: str) -> int:
        check = sqlite3.connect(self.store.path)
        try:
            return int(check.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
        finally:
            check.close()

    async def test_threeRowsWhateverTheRecipients(self) -> None:
        umlaut = Recipient("jörg@bücher.example", "email")
        recipients = tuple(Recipient(f"r{i}@example.com", "email") for i in range(50))
        many = await self.enqueued(recipients=(PHONE, umlaut, *recipients))
        self.assertEqual(await self.store.getNotification(many.notification_id), many)
        for table, rows in [("notifications", 1), ("messages", 1), ("queue", 1)]:
            self.assertEqual(self.count(table), rows, table)
        self.assertEqual((self.count("recipients"), self.count("status_events")), (0, 0))
        trail = await self.store.statusTrail(many.notification_id)
        self.assertEqual([e.recipient for e in trail], list(many.recipients))
        self.assertEqual({(e.status_code, e.timestamp) for e in trail}, {("CAAS_RECEIVED", T0)})
        self.assertEqual(trail[0].status_text, STATUS_TEXTS["CAAS_RECEIVED"])

    async def test_laterEventsInTimeOrder(self) -> None:
        notification = await self.enqueued(recipients=(ALICE, BOB))
        nid = notification.notification_id
        sent = StatusEvent(nid, BOB, "CAAS_SENT", "Successful", T0)  # the same moment
        early = StatusEvent(nid, ALICE, "CAAS_SENT", "Successful", T0 - timedelta(seconds=1))
        later = StatusEvent(nid, ALICE, "CAAS_DELIVERED", "Delivered", T0 + timedelta(seconds=1))
        await self.store.addEvents([later, sent, early])
        trail = await self.store.statusTrail(nid)
        received = [StatusEvent(nid, r, "CAAS_RECEIVED", "Successful", T0) for r in (ALICE, BOB)]
        self.assertEqual(trail, [early, *received, sent, later])


class WriterOrderTests(TestCase):
    """The writer's batch runs file by file, but a request for every file stays in place."""

    async def test_requestForEveryFileBetweenWrites(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        files = [directory / "one.sqlite3", directory / "two.sqlite3"]

        def connect(path: Path) -> sqlite3.Connection:
            connection = sqlite3.connect(path, isolation_level=None)
            connection.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
            return connection

        writer = GroupCommitThread("test-writer", connect, reactor, files[0], lambda: files)
        await writer.start()
        self.addCleanup(writer.stop)

        def insert(value: int) -> Any:
            return lambda c: c.execute("INSERT INTO t VALUES (?)", (value,))

        def count(connection: sqlite3.Connection) -> int:
            return int(connection.execute("SELECT COUNT(*) FROM t").fetchone()[0])

        # Submitted together, so the writer takes them as one batch.
        first = writer.submit(insert(1))
        other = writer.submit(insert(2), files[1])
        counted = writer.submitEach(count)
        after = [writer.submit(insert(3)), writer.submit(insert(4), files[1])]
        await gatherResults([first, other, *after])
        self.assertEqual(await counted, [(files[0], 1), (files[1], 1)])
        self.assertEqual(await writer.submitEach(count), [(files[0], 2), (files[1], 2)])


class _CountedThreadCalls:
    """The reactor, counting the calls a database thread makes into it."""

    def __init__(self) -> None:
        self.calls = 0

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.calls += 1
        reactor.callFromThread(f, *args)


class ReaderTakeTests(TestCase):
    async def test_readsWaitingTogetherAnsweredInOneCall(self) -> None:
        """Reads that wait for the reader together run one after another and their answers
        reach the reactor thread in one call: a status request's two reads wake it once."""
        path = Path(self.mktemp())
        sqlite3.connect(path).close()
        calls = _CountedThreadCalls()
        reader = DatabaseThread(
            "test-reader",
            lambda p: sqlite3.connect(p, isolation_level=None),
            calls,
            path,
            lambda: [path],
        )
        await reader.start()
        self.addCleanup(reader.stop)
        running, gate = threading.Event(), threading.Event()

        def holdTheReader(connection: sqlite3.Connection) -> bool:
            running.set()
            return gate.wait(10)

        held = reader.submit(holdTheReader)
        self.assertTrue(running.wait(10))  # taken alone: the reads below wait behind it
        answers = [
            reader.submit(lambda c, n=n: c.execute("SELECT ?", (n,)).fetchone()[0])
            for n in range(3)
        ]
        callsBefore = calls.calls
        gate.set()
        self.assertTrue(await held)
        self.assertEqual(await gatherResults(answers), [0, 1, 2])
        self.assertEqual(calls.calls - callsBefore, 2)  # the gate's answer, then the three


@dataclasses.dataclass(frozen=True)
class _Row:
    """A batchable write of one row of ``t`` (a UNIQUE column): like the store's enqueues."""

    value: int

    def __call__(self, connection: sqlite3.Connection) -> int:
        (value,) = _Row.runBatch(connection, [self])
        return value

    @staticmethod
    def runBatch(connection: sqlite3.Connection, works: Sequence[_Row]) -> list[int]:
        connection.executemany("INSERT INTO t VALUES (?)", [(w.value,) for w in works])
        return [w.value for w in works]


class WriterBatchTests(TestCase):
    """
    A group that is one batch commits without savepoints; when a request in it fails, the
    others still commit together and only the bad one fails.
    """

    async def setUp(self) -> None:
        self.statements: list[str] = []
        home = Path(self.mktemp())
        home.parent.mkdir(parents=True, exist_ok=True)

        def connect(path: Path) -> sqlite3.Connection:
            connection = sqlite3.connect(path, isolation_level=None)
            connection.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER UNIQUE)")
            connection.set_trace_callback(self.statements.append)
            return connection

        self.writer = GroupCommitThread("test-writer", connect, reactor, home, lambda: [home])
        await self.writer.start()
        self.addCleanup(self.writer.stop)

    async def submittedTogether(self, works: list[Work], wait: bool = True) -> list[Deferred[Any]]:
        """Submit ``works`` while the writer is held by another request, so that it takes
        them as one group; returns their Deferreds once the group has run (``wait``), or once
        the writer has taken them."""
        started, release = threading.Event(), threading.Event()

        def hold(connection: sqlite3.Connection) -> None:
            started.set()
            release.wait(10)

        held = self.writer.submit(hold)
        started.wait(10)  # the writer has taken it: what follows waits in its queue
        submitted = [self.writer.submit(work) for work in works]
        release.set()
        await held
        if wait:
            await DeferredList(submitted, consumeErrors=False)
        return submitted

    async def test_oneBatchRunsWithoutSavepoints(self) -> None:
        before = self.writer.commits
        self.statements.clear()
        done = await self.submittedTogether([_Row(i) for i in range(5)])
        self.assertEqual([await d for d in done], list(range(5)))
        self.assertEqual(self.writer.commits - before, 2)  # the holder, then the group
        self.assertFalse([s for s in self.statements if "SAVEPOINT" in s], self.statements)

    async def test_badRequestInABatchFailsAlone(self) -> None:
        await self.writer.submit(_Row(99))
        before = self.writer.commits
        done = await self.submittedTogether([_Row(1), _Row(2), _Row(99), _Row(3)])
        self.assertEqual([await d for d in (done[0], done[1], done[3])], [1, 2, 3])
        with self.assertRaises(StoreError):
            await done[2]
        # The holder, then the group once more, each request in a savepoint: one commit.
        self.assertEqual(self.writer.commits - before, 2)

        def values(connection: sqlite3.Connection) -> list[int]:
            return [x for (x,) in connection.execute("SELECT x FROM t ORDER BY rowid")]

        self.assertEqual(await self.writer.submit(values), [99, 1, 2, 3])

    async def test_aheadRunsFirstAndIsAnsweredAtOnce(self) -> None:
        """An Ahead write taken with others runs before them, in a transaction of its own,
        and is answered before them."""
        started, release = threading.Event(), threading.Event()

        def hold(connection: sqlite3.Connection) -> None:
            started.set()
            release.wait(10)

        def claim(connection: sqlite3.Connection) -> str:
            return "claimed"

        held = self.writer.submit(hold)
        started.wait(10)
        before = self.writer.commits
        answered: list[Any] = []
        submitted = [self.writer.submit(work) for work in (_Row(1), Ahead(claim), _Row(2))]
        for d in submitted:
            d.addCallback(lambda result: answered.append(result) or result)
        release.set()
        await held
        await DeferredList(submitted, consumeErrors=False)
        self.assertEqual(answered, ["claimed", 1, 2])
        # the holder, the claim alone, then the two rows as one batch
        self.assertEqual(self.writer.commits - before, 3)

    async def test_aGroupGivesWayToAhead(self) -> None:
        """An Ahead write submitted while a group of InSequence writes runs goes next: the
        group commits what it ran, the Ahead write runs and is answered, then the rest of the
        group, in order."""
        inFirst, releaseFirst = threading.Event(), threading.Event()

        def row(value: int) -> Work:
            def insert(connection: sqlite3.Connection) -> int:
                if value == 1:
                    inFirst.set()
                    releaseFirst.wait(10)
                connection.execute("INSERT INTO t VALUES (?)", (value,))
                return value

            return insert

        def claim(connection: sqlite3.Connection) -> list[int]:
            return [x for (x,) in connection.execute("SELECT x FROM t ORDER BY rowid")]

        before = self.writer.commits
        group = await self.submittedTogether([InSequence(row(n)) for n in range(1, 6)], wait=False)
        answered: list[Any] = []
        for d in group:
            d.addCallback(lambda result: answered.append(result) or result)
        self.assertTrue(inFirst.wait(10))  # the group runs, held in its first write
        ahead = self.writer.submit(Ahead(claim))
        ahead.addCallback(lambda result: answered.append(result) or result)
        releaseFirst.set()
        await DeferredList([*group, ahead], consumeErrors=False)
        self.assertEqual(answered, [1, [1], 2, 3, 4, 5])
        # the holder, the group's first write, the Ahead write, then the rest of the group
        self.assertEqual(self.writer.commits - before, 4)

    async def test_anAheadTakenWithTheGroupNeedsNoWay(self) -> None:
        """Once taken, an Ahead write stops no group: it has run first already."""
        before = self.writer.commits
        done = await self.submittedTogether(
            [InSequence(lambda c, n=n: n) for n in range(3)] + [Ahead(lambda c: "claimed")]
        )
        self.assertEqual([await d for d in done], [0, 1, 2, "claimed"])
        # the holder, the Ahead write, then the group as one
        self.assertEqual(self.writer.commits - before, 3)


class StatementsTests(TestCase):
    """Statements over many rows: every row, in order, in few statements."""

    def test_rowsInChunks(self) -> None:
        connection = sqlite3.connect(":memory:", isolation_level=None)
        connection.execute("CREATE TABLE t (n INTEGER, word TEXT)")
        statements: list[str] = []
        connection.set_trace_callback(statements.append)
        for count, inserts in [(0, 0), (1, 1), (3, 2), (64, 1), (65, 2), (200, 4)]:
            with self.subTest(count=count):
                connection.execute("DELETE FROM t")
                statements.clear()
                rows = [(i, f"w{i}") for i in range(count)]
                insertRows(connection, "t (n, word)", rows)
                self.assertEqual(len(statements), inserts, statements)
                self.assertEqual(list(connection.execute("SELECT n, word FROM t")), rows)

    def test_listsInChunks(self) -> None:
        """An ``IN`` list of any length finds every row asked for, in chunks of powers of
        two (few distinct statements to prepare), none longer than 256 values."""
        connection = sqlite3.connect(":memory:", isolation_level=None)
        connection.execute("CREATE TABLE t (n INTEGER PRIMARY KEY)")
        insertRows(connection, "t (n)", [(n,) for n in range(1000)])
        query = "SELECT n FROM t WHERE n IN (?*) ORDER BY n"
        for count, chunks in [
            (0, []),
            (1, [1]),
            (3, [2, 1]),
            (256, [256]),
            (700, [256] * 2 + [128, 32, 16, 8, 4]),
        ]:
            with self.subTest(count=count):
                wanted = list(range(0, 2 * count, 2))
                found = []
                sizes = []
                for chunk in inChunks(wanted):
                    sizes.append(len(chunk))
                    found += [n for (n,) in connection.execute(withList(query, chunk), chunk)]
                self.assertEqual(sizes, chunks)
                self.assertEqual(found, [n for n in wanted if n < 1000])

    def test_oneListPerStatement(self) -> None:
        """A statement without its list's mark, or with two, is a mistake said at once."""
        for statement in (
            "SELECT n FROM t WHERE n = ?",
            "SELECT n FROM t WHERE n IN (?*) OR m IN (?*)",
        ):
            with self.subTest(statement=statement):
                self.assertRaises(ValueError, withList, statement, [1])


class ReportQueueTests(ReportQueueTestsMixin, SQLiteStoreTestsBase):
    pass


class GatewayIdsTests(GatewayIdsTestsMixin, SQLiteStoreTestsBase):
    pass


class WorkerFileGatewayIdsTests(GatewayIdsTestsMixin, WorkerFileTestsBase):
    pass
