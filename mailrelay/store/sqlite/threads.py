"""
Threads that own SQLite connections, so that no disk I/O ever runs on the reactor thread.

A ``sqlite3`` connection belongs to the thread that made it. Each :class:`DatabaseThread` makes
its connection in its own thread and runs *work* on it: a callable ``work(connection) -> result``.
Callers on the reactor thread get a Deferred that fires (through ``reactor.callFromThread``) with
the result, or fails with :class:`~mailrelay.interfaces.StoreError` -- never with a raw
``sqlite3`` exception.

:class:`GroupCommitThread` is the single writer: it runs every write request that is waiting in
one transaction and commits once, so one fsync covers many callers.
"""

from __future__ import annotations

import fcntl
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger

from mailrelay.interfaces import AlreadyExists, NotFound, StoreError

Work = Callable[[sqlite3.Connection], Any]
Connect = Callable[[], sqlite3.Connection]
RunBatch = Callable[[sqlite3.Connection, Sequence[Any]], Sequence[Any]]
"""
A work object may carry ``runBatch(connection, works) -> results``: the writer then runs a run
of consecutive works with the same ``runBatch`` in one call (one ``executemany`` per table
instead of a handful of ``execute`` calls per work). If the batch fails, each work runs alone.
"""

_STOP = object()
"""Queued by :meth:`DatabaseThread.stop`: everything queued before it still runs."""


@dataclass
class _Request:
    work: Work
    deferred: Deferred[Any]


@dataclass
class _Outcome:
    request: _Request
    ok: bool
    value: Any  # the work's result, or the StoreError to fail with


def asStoreError(error: BaseException) -> StoreError:
    """``error`` as the StoreError a store caller expects (the original is its ``__cause__``)."""
    if isinstance(error, StoreError):
        return error
    wrapped = StoreError(f"sqlite store: {error}")
    wrapped.__cause__ = error
    return wrapped


class DatabaseThread:
    """
    One thread, one connection, one request at a time (in the order submitted).

    Used as is for reads: each work function runs in autocommit mode and may open its own
    ``BEGIN`` ... ``COMMIT`` for a consistent snapshot over several queries.
    """

    log = Logger()

    def __init__(self, name: str, connect: Connect, reactor: IReactorThreads) -> None:
        self._name = name
        self._connect = connect
        self._reactor = reactor
        self._queue: queue.SimpleQueue[_Request | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._connection: sqlite3.Connection | None = None
        self._openError: StoreError | None = None
        self._started: Deferred[None] = Deferred()
        self._whenStopped: list[Deferred[None]] = []
        self._state = "new"  # -> "running" -> "stopping" -> "stopped"

    def start(self) -> Deferred[None]:
        """Start the thread and make the connection; fails with StoreError if that fails."""
        assert self._state == "new", "a DatabaseThread starts once"
        self._state = "running"
        self._thread.start()
        return self._started

    def submit(self, work: Work) -> Deferred[Any]:
        """Run ``work(connection)`` on the thread. Returns a Deferred of its result."""
        if self._state != "running":
            return _failed(StoreError("store is not open"))
        request = _Request(work, Deferred())
        self._queue.put(request)
        return request.deferred

    def stop(self) -> Deferred[None]:
        """Finish everything submitted so far, close the connection, end the thread."""
        if self._state == "new":
            self._state = "stopped"
        if self._state == "stopped":
            return succeed(None)
        if self._state == "running":
            self._state = "stopping"
            self._queue.put(_STOP)
        stopped: Deferred[None] = Deferred()
        self._whenStopped.append(stopped)
        return stopped

    def _finished(self) -> None:
        # The thread called this as its very last act: the join returns at once.
        self._thread.join()
        self._state = "stopped"
        waiting, self._whenStopped = self._whenStopped, []
        for stopped in waiting:
            stopped.callback(None)

    # -- everything below runs on the database thread --

    def _run(self) -> None:
        try:
            self._connection = self._connect()
        except BaseException as e:
            self._openError = asStoreError(e)
            self._reactor.callFromThread(self._started.errback, self._openError)
        else:
            self._reactor.callFromThread(self._started.callback, None)
        while True:
            requests, stop = self._take()
            if requests:
                outcomes = self._execute(requests)
                self._reactor.callFromThread(self._deliver, outcomes)
            if stop:
                break
        if self._connection is not None:
            self._connection.close()
        self._reactor.callFromThread(self._finished)

    def _take(self) -> tuple[list[_Request], bool]:
        """Block for the next request. Returns (requests, whether to stop after them)."""
        item = self._queue.get()
        if item is _STOP:
            return [], True
        assert isinstance(item, _Request)
        return [item], False

    def _execute(self, requests: Sequence[_Request]) -> list[_Outcome]:
        connection = self._connection
        if connection is None:
            assert self._openError is not None
            return [_Outcome(r, False, self._openError) for r in requests]
        return [self._runOne(connection, r) for r in requests]

    def _runOne(self, connection: sqlite3.Connection, request: _Request) -> _Outcome:
        try:
            return _Outcome(request, True, request.work(connection))
        except Exception as e:
            _rollbackQuietly(connection)
            return _Outcome(request, False, asStoreError(e))

    # -- back on the reactor thread --

    def _deliver(self, outcomes: list[_Outcome]) -> None:
        for outcome in outcomes:
            if outcome.ok:
                outcome.request.deferred.callback(outcome.value)
            else:
                error = outcome.value
                if not isinstance(error, AlreadyExists | NotFound):
                    self.log.error(
                        "{thread}: store operation failed: {error}",
                        thread=self._name,
                        error=str(error),
                    )
                outcome.request.deferred.errback(error)


class GroupCommitThread(DatabaseThread):
    """
    The single writer, with group commit.

    It blocks for the first request, then takes every request already waiting (at most
    ``groupLimit``), runs them all in one ``BEGIN IMMEDIATE`` transaction -- each inside its own
    SAVEPOINT, so a request that fails is rolled back alone and the others go on -- and commits
    once. Only after COMMIT returned (with ``synchronous=FULL``: after the fsync) does any caller
    hear of success. If the transaction as a whole fails (COMMIT fails, or SQLite abandons the
    transaction, e.g. disk full), it is rolled back and each request is retried in a transaction
    of its own, so one bad request fails alone.

    ``commits`` counts successful COMMITs, so one can see the grouping at work.

    ``writeLock`` names a lock file shared with the writers of other processes (the relay's
    workers): each write transaction holds an exclusive ``flock`` on it, so a writer waits in
    the kernel and starts the moment the other is done (SQLite's own busy handler would sleep
    up to 100 ms between tries).
    """

    def __init__(
        self,
        name: str,
        connect: Connect,
        reactor: IReactorThreads,
        groupLimit: int = 256,
        writeLock: Path | None = None,
    ) -> None:
        super().__init__(name, self._connectWithLock, reactor)
        self.groupLimit = groupLimit
        self.commits = 0
        self._connectDatabase = connect
        self._writeLockPath = writeLock
        self._writeLock: int | None = None

    def _connectWithLock(self) -> sqlite3.Connection:
        if self._writeLockPath is not None:
            self._writeLock = os.open(self._writeLockPath, os.O_RDWR | os.O_CREAT, 0o600)
        return self._connectDatabase()

    def _run(self) -> None:
        try:
            super()._run()
        finally:
            if self._writeLock is not None:
                os.close(self._writeLock)

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """
        Hold the cross-process write lock (if any) for one write transaction. ``flock``
        waits in the kernel (without the GIL) and returns the moment the other writer is
        done: polling with sleeps, as SQLite's busy handler does, cost a third of the
        throughput of two workers. A worker stopped while it holds the lock is found silent
        and killed by the main process (:mod:`mailrelay.workers.pool`), which frees it.
        """
        fd = self._writeLock
        if fd is None:
            yield
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _take(self) -> tuple[list[_Request], bool]:
        requests, stop = super()._take()
        if not stop:
            stop = self._drain(requests)
        return requests, stop

    def _drain(self, requests: list[_Request]) -> bool:
        """Add to ``requests`` what waits in the queue (up to ``groupLimit`` in all); whether
        the stop marker was met (everything before it is taken)."""
        while len(requests) < self.groupLimit:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            assert isinstance(item, _Request)
            requests.append(item)
        return False

    def _execute(self, requests: Sequence[_Request]) -> list[_Outcome]:
        connection = self._connection
        if connection is None:
            return super()._execute(requests)
        with self._turn():
            group = self._arrivedMeanwhile(list(requests))
            if len(group) == 1:
                return [self._runOneHolding(connection, group[0])]
            try:
                return self._runGroup(connection, group)
            except Exception:
                _rollbackQuietly(connection)  # before another process may write
        return [self._runOne(connection, r) for r in group]

    def _arrivedMeanwhile(self, requests: list[_Request]) -> list[_Request]:
        """With the cross-process lock, the writes that came while this writer waited for it
        join the group: the longer the wait, the more one commit carries."""
        if self._writeLock is not None and self._drain(requests):
            self._queue.put(_STOP)  # nothing comes after it: the loop stops next time
        return requests
        while len(requests) < self.groupLimit:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._queue.put(_STOP)  # nothing comes after it: the loop stops next time
                break
            assert isinstance(item, _Request)
            requests.append(item)
        return requests

    def _runGroup(
        self, connection: sqlite3.Connection, requests: Sequence[_Request]
    ) -> list[_Outcome]:
        connection.execute("BEGIN IMMEDIATE")
        outcomes: list[_Outcome] = []
        i = 0
        while i < len(requests):
            runBatch: RunBatch | None = getattr(requests[i].work, "runBatch", None)
            end = i + 1
            if runBatch is not None:
                while end < len(requests) and getattr(requests[end].work, "runBatch", None) is (
                    runBatch
                ):
                    end += 1
            if end - i > 1:
                assert runBatch is not None
                outcomes.extend(self._inSavepoint(connection, requests[i:end], runBatch))
            else:
                outcomes.extend(self._inSavepoint(connection, requests[i:end], None))
            i = end
        connection.execute("COMMIT")
        self.commits += 1
        return outcomes

    def _inSavepoint(
        self,
        connection: sqlite3.Connection,
        requests: Sequence[_Request],
        runBatch: RunBatch | None,
    ) -> list[_Outcome]:
        """Run one request, or a batch of them, so that a failure undoes only their part."""
        connection.execute("SAVEPOINT request")
        try:
            if runBatch is None:
                (request,) = requests
                outcomes = [_Outcome(request, True, request.work(connection))]
            else:
                results = runBatch(connection, [r.work for r in requests])
                outcomes = [_Outcome(r, True, v) for r, v in zip(requests, results, strict=True)]
        except Exception as e:
            if not connection.in_transaction:
                raise  # SQLite gave up the whole transaction: retry one by one
            connection.execute("ROLLBACK TO request")
            connection.execute("RELEASE request")
            if runBatch is None:
                return [_Outcome(requests[0], False, asStoreError(e))]
            return [o for r in requests for o in self._inSavepoint(connection, [r], None)]
        connection.execute("RELEASE request")
        return outcomes

    def _runOne(self, connection: sqlite3.Connection, request: _Request) -> _Outcome:
        with self._turn():
            return self._runOneHolding(connection, request)

    def _runOneHolding(self, connection: sqlite3.Connection, request: _Request) -> _Outcome:
        """One request in a transaction of its own; the caller holds the write lock."""
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                result = request.work(connection)
                connection.execute("COMMIT")
            except Exception:
                _rollbackQuietly(connection)
                raise
        except Exception as e:
            return _Outcome(request, False, asStoreError(e))
        self.commits += 1
        return _Outcome(request, True, result)


def _rollbackQuietly(connection: sqlite3.Connection) -> None:
    if connection.in_transaction:
        try:
            connection.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the original error is the one to report


def _failed(error: StoreError) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d
