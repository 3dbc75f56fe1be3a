"""
The SQLite store's files, the threads that read and write them, and which file holds what.

Files. The main file (``mailrelay.sqlite3``) holds the accounts, API keys and senders, and the
notifications the main process accepted. With several workers, worker *K* writes the
notifications it accepts to a file of its own beside it, ``mailrelay.worker-K.sqlite3``
(:func:`workerFile`), so no process's intake waits for another's commits. Reads look in every
file there is (a notification lives in exactly one), so the status API and the admin command
see all of them, from any process, whatever ``workers`` is now; a write about a notification
goes only to the file that holds it (:meth:`StoreFiles.onItsFile`). The main process brings
every worker's file to the current schema at open.

Threads. No SQLite call runs on the reactor thread:

- *writes* go to one :class:`~mailrelay.store.sqlite.threads.GroupCommitThread` for the files
  this process owns (:meth:`StoreFiles.owns`), which owns their only write connection and
  commits waiting requests together (one fsync for a group), so the Deferred of an enqueue
  fires only after the message is on disk; the rare writes to files other processes own (the
  main process's report outbox in a worker's file) go to a second one
  (:class:`~mailrelay.store.sqlite.threads.SplitWriter`), so that waiting for the other
  process's lock never holds up this process's own writes;
- *reads* go to one reader thread with its own connection. WAL lets it read while the writer
  writes. Reads are indexed lookups costing microseconds, and the hop to a thread costs a few
  tens; in exchange a cold page cache, a checkpoint or a slow disk never stalls the reactor that
  serves every SMTP connection (and an AUTH already spends ~50 ms in Argon2 anyway).

Several processes may open the same file (the ``mailrelay`` admin command while the server runs):
SQLite's locks serialise their writes, and a busy timeout makes each wait its turn.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailrelay.interfaces import StoreError
from mailrelay.store.common import idNumber
from mailrelay.store.sqlite.bodies import SegmentWriter, segmentDirectory, sweepSegment
from mailrelay.store.sqlite.migrate import upgrade
from mailrelay.store.sqlite.threads import (
    DatabaseThread,
    GroupCommitThread,
    InlineReader,
    InSequence,
    SplitWriter,
)

BUSY_TIMEOUT = 10.0
"""Seconds a connection waits for another process's lock before giving up (-> StoreError)."""
_MOST_REMEMBERED_FILES = 100_000
"""Claimed notifications whose file a store remembers; past it, it forgets them all."""

_STILL_NS = 2_000_000_000
"""How long a directory must have been unchanged before its listing is kept (ns)."""

NumberedWork = Callable[..., Any]
"""Work about one notification: ``work(connection, number=...)`` (the notification id as
stored; None for some: every entry)."""

T = TypeVar("T")


def workerFile(main: Path, index: int) -> Path:
    """The file worker ``index`` (1, 2, ...) writes the notifications it accepts to, beside the
    main file ``main``: ``mailrelay.worker-1.sqlite3`` for ``mailrelay.sqlite3``."""
    return main.with_name(f"{main.stem}.worker-{index}{main.suffix}")


def workerIndex(main: Path, file: Path) -> int | None:
    """The index of the worker whose file ``file`` is (see :func:`workerFile`), or None."""
    prefix, suffix = f"{main.stem}.worker-", main.suffix
    name = file.name
    if file.parent != main.parent or not name.startswith(prefix) or not name.endswith(suffix):
        return None
    index = name[len(prefix) : len(name) - len(suffix)]
    return int(index) if index.isascii() and index.isdigit() else None


class StoreFiles:
    """
    The main file ``path`` and the workers' files beside it; ``home``, the file this process's
    enqueues go to; the ``writer``, ``reader`` and ``counter`` (the queue's counts) threads over
    all of them, and the ``segments``
    the writer appends the home file's large bodies to. See the module docstring.
    """

    log = Logger()

    def __init__(
        self,
        path: Path,
        home: Path,
        reactor: Any,
        groupLimit: int,
        busyTimeout: float,
        deliveringWorkers: int = 0,
        inlineReads: bool = False,
    ) -> None:
        self.path = path
        self.home = home
        self.deliveringWorkers = deliveringWorkers
        self._busyTimeout = busyTimeout
        self._clock: IReactorTime = reactor
        self.writer = SplitWriter(
            GroupCommitThread(
                "mailrelay-sqlite-writer",
                self._connectWriter,
                reactor,
                home,
                self.claimFiles,
                groupLimit,
            ),
            GroupCommitThread(
                "mailrelay-sqlite-foreign-writer",
                self._connectForeignWriter,
                reactor,
                path,
                lambda: [file for file in self.notificationFiles() if not self.owns(file)],
                groupLimit,
            ),
            self.owns,
            self.notificationFiles,
        )
        # A process that only reads (the web process) reads on its reactor thread.
        self.reader = (InlineReader if inlineReads else DatabaseThread)(
            "mailrelay-sqlite-reader",
            self._connectReader,
            reactor,
            path,
            self.notificationFiles,
        )
        # The queue's counts read every entry's index row (about 0.1 s a million): on a thread
        # of their own, a /metrics scrape does not hold up the claims and status reads.
        self.counter = DatabaseThread(
            "mailrelay-sqlite-counter",
            self._connectReader,
            reactor,
            path,
            self.notificationFiles,
        )
        self._claimedIn: dict[int, Path] = {}
        self._workerFilesSeen: tuple[int, list[tuple[int, Path]]] | None = None
        # Only the writer thread appends to the home file's segments (see bodies.py).
        self.segments = SegmentWriter(segmentDirectory(home))

    def now(self) -> int:
        """The reactor's time, in milliseconds as stored."""
        return int(self._clock.seconds() * 1000)

    def notificationFiles(self) -> list[Path]:
        """Every file notifications may be in: the main file, then the workers' files that
        exist, in worker order."""
        return [self.path, *(file for _, file in self._workerFiles())]

    def _workerFiles(self) -> list[tuple[int, Path]]:
        """The workers' files there are, by index. Asked for at every claim and every read
        of each file, so the directory is listed again only when its modification time has
        changed (a file was made or removed in it); any thread may ask."""
        try:
            changed = os.stat(self.path.parent).st_mtime_ns
        except OSError:
            changed = None
        seen = self._workerFilesSeen
        if seen is not None and seen[0] == changed:
            return seen[1]
        workers = []
        for candidate in self.path.parent.glob(f"{self.path.stem}.worker-*{self.path.suffix}"):
            index = workerIndex(self.path, candidate)
            if index is not None:
                workers.append((index, candidate))
        workers.sort()
        # A file made within the same tick of the file system's clock may not change the
        # time again: what was listed is kept only once the directory has been still a while.
        if changed is not None and time.time_ns() - changed > _STILL_NS:
            self._workerFilesSeen = (changed, workers)
        return workers

    def claimFiles(self) -> list[Path]:
        """
        The files this process's delivery claims from, and its own writer writes: those it
        owns (:meth:`owns`). Each process delivers what it accepted, so no two processes write
        to one file at once.
        """
        return [file for file in self.notificationFiles() if self.owns(file)]

    def owns(self, file: Path) -> bool:
        """Whether this process is the one that writes ``file`` most: a worker its home file;
        the main process the main file and those of workers 1 to ``deliveringWorkers``
        (the main file, and those of workers that no longer run). Others write to it only
        now and then, through the writer's foreign thread (:class:`SplitWriter`)."""
        if file == self.home:
            return True
        if self.home != self.path:
            return False
        index = workerIndex(self.path, file)
        return index is not None and index > self.deliveringWorkers

    # -- connections, opening and closing --

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
        return self._prepareWriter(self._connect(path, create=True))

    def _connectForeignWriter(self, path: Path) -> sqlite3.Connection:
        # Another process's file: its owner makes it (a missing one is an error, as for
        # the readers); this process may bring it to the current schema.
        return self._prepareWriter(self._connect(path, create=False))

    def _prepareWriter(self, connection: sqlite3.Connection) -> sqlite3.Connection:
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

    async def open(self) -> None:
        """Start the threads, creating or upgrading the schema first; closes again if that
        fails."""
        try:
            await self.writer.start()
            if self.home == self.path:
                # The main process (or the admin command) brings the workers' files to this
                # schema too, before anything reads them with its queries: a worker upgrades
                # its own only when it starts, and one no longer configured never does.
                await self.writer.submitEach(_nothing)
            await self.reader.start()
            await self.counter.start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Finish every write already asked for, then stop the threads."""
        await self.writer.stop()
        await self.reader.stop()
        await self.counter.stop()
        self.segments.close()

    # -- which file holds a notification --

    def rememberFile(self, number: int, file: Path) -> None:
        """Remember which file holds a claimed notification, for the writes about it (a
        notification never moves, so what is remembered stays true)."""
        if len(self._claimedIn) >= _MOST_REMEMBERED_FILES:
            self._claimedIn.clear()
        self._claimedIn[number] = file

    async def fileOf(self, number: int) -> Path | None:
        """The file that holds notification ``number``, or None if none does."""
        file = self._claimedIn.get(number)
        if file is not None:
            return file
        found = await self.reader.submitEach(partial(present, numbers=(number,)))
        return next((file for file, there in found if there), None)

    async def onItsFile(
        self, notificationId: str, work: NumberedWork, missing: StoreError | None
    ) -> Any:
        """``work(connection, number=...)`` on the file that holds the notification; if no
        file does, fails with ``missing`` (None: returns None)."""
        number = requireId(notificationId)
        file = await self.fileOf(number)
        if file is None:
            if missing is None:
                return None
            raise missing
        return await self.writer.submit(InSequence(partial(work, number=number)), file)

    async def filesWhere(self, check: Callable[[sqlite3.Connection], bool]) -> list[Path]:
        """The files where ``check`` holds, looked at by the reader. A write that may concern
        any file goes only to those: a write to a worker's file waits for that worker's write
        lock (seconds, behind its commits, when it is busy), and holds up the writes queued
        behind it meanwhile."""
        return [file for file, holds in await self.reader.submitEach(check) if holds]

    async def sweep(self, notificationId: str, segment: int | None) -> None:
        """Delete the body segment a write left unreferenced, if any, in a write of its own:
        only once no committed row can need it again."""
        if segment is None:
            return
        file = await self.fileOf(requireId(notificationId))
        if file is None:
            return
        try:
            await self.writer.submit(partial(sweepSegment, segment=segment), file)
        except StoreError as e:  # the next expiry sweeps it
            self.log.warn("could not delete body segment {n}: {error}", n=segment, error=str(e))


# What a read or write of every file gives: ``[(file, result), ...]``; what callers want of it.


def total(parts: Sequence[tuple[Path, int]]) -> int:
    """The sum of every file's count."""
    return sum(count for _, count in parts)


def firstFound(parts: Sequence[tuple[Path, T | None]]) -> T | None:
    """The first file's result that is not None (a notification is in one file only)."""
    return next((found for _, found in parts if found is not None), None)


# Work functions every concern uses, on a database thread.


def requireId(notificationId: str) -> int:
    """The number notification ``notificationId`` is stored as; StoreError if it is none."""
    number = idNumber(notificationId)
    if number is None:
        raise StoreError(f"not a notification id: {notificationId!r}")
    return number


def present(connection: sqlite3.Connection, numbers: tuple[int, ...]) -> set[int]:
    """Which of the notifications ``numbers`` this file has."""
    return {
        number
        for number in numbers
        if connection.execute("SELECT 1 FROM notifications WHERE id = ?", (number,)).fetchone()
    }


@contextmanager
def snapshot(connection: sqlite3.Connection) -> Iterator[None]:
    """One snapshot for the reads inside: a reader connection is in autocommit mode, where each
    query would see the file as it is at that query."""
    connection.execute("BEGIN")
    try:
        yield
    finally:
        connection.execute("COMMIT")


def _nothing(connection: sqlite3.Connection) -> None:
    """A write that changes nothing: connecting for it brings the file's schema up to date."""
