"""
Tests for the embedded SQLite store: the shared store suite, then what only SQLite promises --
data on disk across restarts and crashes, group commit, and StoreError for every failure.
Real files under the trial temp directory; no mocks.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import signal
import sqlite3
import stat
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from mailrelay.config import parseConfig
from mailrelay.interfaces import AlreadyExists, StoreError
from mailrelay.model import QueueStats
from mailrelay.store import makeStore
from mailrelay.store.sqlite import SQLiteStore
from mailrelay.store.sqlite.migrate import schemaScripts, statements
from tests.store_mixin import (
    ALICE,
    DeliveryQueueTestsMixin,
    RememberedAccountDataTestsMixin,
    StoreHelpersMixin,
    StoreTestsMixin,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


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


class SQLiteStoreTests(StoreTestsMixin, SQLiteStoreTestsBase):
    """The shared suite, against SQLite."""

    def finishDelivery(self, notificationId: str) -> Deferred[None]:
        return self.store.complete(notificationId)


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

    def test_crashAfterEnqueue(self) -> Deferred[None]:
        """
        A process that was told its enqueue succeeded is killed at once (SIGKILL: no cleanup, no
        close); the notification is there when the store is opened again.
        """
        path = self.databasePath()
        printed: Deferred[str] = Deferred()
        ended: Deferred[BaseException] = Deferred()
        child = _LineThenEnd(printed, ended)
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        process = reactor.spawnProcess(
            child, sys.executable, [sys.executable, "-c", CRASH_SCRIPT, str(path)], env=env
        )
        timeout = reactor.callLater(30, process.signalProcess, "KILL")

        async def check() -> None:
            notificationId = await printed
            os.kill(process.pid, signal.SIGKILL)
            reason = await ended
            timeout.cancel()
            assert isinstance(reason, ProcessTerminated)
            self.assertEqual(reason.signal, signal.SIGKILL)

            store = await self.openStore(path)
            notification = await store.getNotification(notificationId)
            self.assertIsNotNone(notification)
            self.assertEqual(notification.recipients, (ALICE,))
            self.assertEqual(await store.stats(), QueueStats(queued=1, deferred=0, in_flight=0))
            (entry,) = await store.claim(10, 60)
            self.assertEqual(entry.message, b"Subject: crash\r\n\r\nbody\r\n")

        return Deferred.fromCoroutine(check())


CRASH_SCRIPT = """
import sys
from datetime import UTC, datetime
from pathlib import Path
from twisted.internet import defer, task
from mailrelay.model import Notification, Recipient
from mailrelay.store.sqlite import SQLiteStore

async def main(reactor):
    store = SQLiteStore(Path(sys.argv[1]), reactor)
    await store.open()
    notification = Notification(
        notification_id=store.nextNotificationId(), account="acme", sender="a@acme.example",
        recipients=(Recipient("name1@customer.com", "email"),), size=24,
        received_at=datetime.now(UTC))
    await store.enqueue(notification, b"Subject: crash\\r\\n\\r\\nbody\\r\\n")
    print(notification.notification_id, flush=True)
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


class AccountDataRememberedTests(RememberedAccountDataTestsMixin, SQLiteStoreTestsBase):
    async def openSharing(self) -> SQLiteStore:
        return await self.openStore(self.store.path)


class WriteLockTests(SQLiteStoreTestsBase):
    """With ``writeLock`` (several worker processes), each write transaction holds an
    exclusive flock on the lock file: a writer waits for it in the kernel, not by polling."""

    async def test_writeWaitsForTheLock(self) -> None:
        path = self.databasePath()
        lockPath = path.with_name("mailrelay.sqlite3.writelock")
        store = self.store = await self.openStore(path, writeLock=lockPath)
        holder = os.open(lockPath, os.O_RDWR)  # another process's writer, as far as flock sees
        self.addCleanup(os.close, holder)
        fcntl.flock(holder, fcntl.LOCK_EX)
        written = store.enqueue(self.notification(), b"body")
        await deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(written.called, "the write did not wait for the lock")
        fcntl.flock(holder, fcntl.LOCK_UN)
        await written
        self.assertEqual((await store.stats()).queued, 1)

    async def test_writesArrivedMeanwhileShareTheCommit(self) -> None:
        """The writes that come while the writer waits for the lock go in its commit."""
        path = self.databasePath()
        lockPath = path.with_name("mailrelay.sqlite3.writelock")
        store = self.store = await self.openStore(path, writeLock=lockPath)
        holder = os.open(lockPath, os.O_RDWR)
        self.addCleanup(os.close, holder)
        fcntl.flock(holder, fcntl.LOCK_EX)
        before = store.commits
        first = store.enqueue(self.notification(), b"body")
        await deferLater(reactor, 0.1, lambda: None)  # the writer has it and waits
        later = [store.enqueue(self.notification(), b"body") for _ in range(10)]
        await deferLater(reactor, 0.1, lambda: None)
        fcntl.flock(holder, fcntl.LOCK_UN)
        await gatherResults([first, *later])
        self.assertEqual(store.commits - before, 1)
        self.assertEqual((await store.stats()).queued, 11)

    async def test_lockFreedAfterAFailedGroup(self) -> None:
        """A group that fails is rolled back and the lock given back: another writer goes on."""
        path = self.databasePath()
        lockPath = path.with_name("mailrelay.sqlite3.writelock")
        store = self.store = await self.openStore(path, writeLock=lockPath)
        duplicate = await self.enqueued()
        results = [store.enqueue(self.notification(), b"body") for _ in range(3)]
        bad = store.enqueue(duplicate, b"again")
        await gatherResults(results)
        with self.assertRaises(AlreadyExists):
            await bad
        other = os.open(lockPath, os.O_RDWR)
        self.addCleanup(os.close, other)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: raises if still held
        fcntl.flock(other, fcntl.LOCK_UN)
        self.assertEqual((await store.stats()).queued, 4)

    async def test_twoWritersOnOneFile(self) -> None:
        """Two stores (as two workers) write to one database at once; nothing is lost."""
        path = self.databasePath()
        lockPath = path.with_name("mailrelay.sqlite3.writelock")
        first = self.store = await self.openStore(path, writeLock=lockPath)
        second = await self.openStore(path, writeLock=lockPath, instanceId=1)
        notifications = []
        writes = []
        for store in (first, second) * 100:
            self.store = store
            notification = self.notification()
            notifications.append(notification)
            writes.append(store.enqueue(notification, b"body"))
        await gatherResults(writes)
        self.assertEqual(len({n.notification_id for n in notifications}), 200)
        self.assertEqual((await first.stats()).queued, 200)
        for notification in notifications[::17]:
            self.assertEqual(
                await second.getNotification(notification.notification_id), notification
            )
