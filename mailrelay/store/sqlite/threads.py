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

import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, FirstError, gatherResults, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger

from mailrelay.interfaces import AlreadyExists, LeaseLost, NotFound, StoreError

Work = Callable[[sqlite3.Connection], Any]
Connect = Callable[[Path], "sqlite3.Connection | None"]
"""Opens a connection to a database file, or returns None if the file is not ready yet (a
worker's file that is still being created); raises if it cannot."""
Files = Callable[[], Sequence[Path]]
"""The database files a request for "each file" runs on, in order (looked up on the thread)."""
RunBatch = Callable[[sqlite3.Connection, Sequence[Any]], Sequence[Any]]
"""
A work object may carry ``runBatch(connection, works) -> results``: the writer then runs a run
of consecutive works with the same ``runBatch`` in one call (a few multi-row inserts for all
of them instead of a handful of ``execute`` calls per work). If the batch fails, each work
runs alone.
"""


@dataclass(frozen=True)
class InSequence:
    """
    A write the writer may run with the other such writes of its group one after another, as
    one batch (see :data:`RunBatch`), instead of each in a savepoint of its own: for the many
    small writes about one notification each (claims, outcomes, leases), whose savepoints
    would cost more than their statements. If one fails, the batch runs again with each in
    its own savepoint, so it fails alone.
    """

    work: Work

    def __call__(self, connection: sqlite3.Connection) -> Any:
        return self.work(connection)

    @staticmethod
    def runBatch(connection: sqlite3.Connection, works: Sequence[InSequence]) -> list[Any]:
        return [work(connection) for work in works]


@dataclass(frozen=True)
class Ahead(InSequence):
    """
    A write the writer runs ahead of the others waiting with it, in a transaction of its own,
    and answers before running them: the delivery loop's claim, which would otherwise wait for
    a group of outcome writes to be run and committed with it, while the loop has nothing to
    start. (Those waiting were submitted independently: no caller depends on their order.)
    A group of :class:`InSequence` writes that is running when one arrives stops after the
    write in hand, commits what it ran and lets it through; the rest of the group runs next.
    """


_STOP = object()
"""Queued by :meth:`DatabaseThread.stop`: everything queued before it still runs."""


@dataclass
class _Request:
    work: Work
    deferred: Deferred[Any]
    target: Path | None  # the file to run on; None: every file, one after another


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
    One thread, its connections, one request at a time: in the order submitted for one file
    (the writer runs a batch file by file, so two files' requests may finish in either order).

    The thread connects to its ``home`` file when it starts (a failure there fails
    :meth:`start` and every request); other files are connected to the first time a request
    names them, or when a request for every file (:meth:`submitEach`) finds them in ``files``.

    Used as is for reads: each work function runs in autocommit mode and may open its own
    ``BEGIN`` ... ``COMMIT`` for a consistent snapshot over several queries.
    """

    log = Logger()
    takeLimit = 16
    """Requests run before their answers go to the reactor thread together."""

    def __init__(
        self, name: str, connect: Connect, reactor: IReactorThreads, home: Path, files: Files
    ) -> None:
        self._name = name
        self._connect = connect
        self._reactor = reactor
        self._home = home
        self._files = files
        self._queue: queue.SimpleQueue[_Request | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._connections: dict[Path, sqlite3.Connection] = {}
        self._openError: StoreError | None = None
        self._started: Deferred[None] = Deferred()
        self._whenStopped: list[Deferred[None]] = []
        self._state = "new"  # -> "running" -> "stopping" -> "stopped"

    def start(self) -> Deferred[None]:
        """Start the thread and connect to the home file; fails with StoreError if that fails."""
        assert self._state == "new", "a DatabaseThread starts once"
        self._state = "running"
        self._thread.start()
        return self._started

    def submit(self, work: Work, target: Path | None = None) -> Deferred[Any]:
        """Run ``work(connection)`` on the file ``target`` (default: the home file). Returns a
        Deferred of its result."""
        return self._submit(work, target or self._home)

    def submitEach(self, work: Work) -> Deferred[list[tuple[Path, Any]]]:
        """Run ``work(connection)`` on every file there is, one after another. Returns a
        Deferred of ``[(file, result), ...]`` in the order of ``files``; fails with the first
        failure (the files before it have run)."""
        return self._submit(work, None)

    def _submit(self, work: Work, target: Path | None) -> Deferred[Any]:
        if self._state != "running":
            return _failed(StoreError("store is not open"))
        request = _Request(work, Deferred(), target)
        self._queue.put(request)
        return request.deferred

    def stop(self) -> Deferred[None]:
        """Finish everything submitted so far, close the connections, end the thread."""
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
            self._readyConnectionTo(self._home)
        except BaseException as e:
            self._openError = asStoreError(e)
            self._reactor.callFromThread(self._started.errback, self._openError)
        else:
            self._reactor.callFromThread(self._started.callback, None)
        while True:
            requests, stop = self._take()
            for part in self._parts(requests):
                outcomes = self._execute(part)
                self._reactor.callFromThread(self._deliver, outcomes)
            if stop:
                break
        for connection in self._connections.values():
            connection.close()
        self._reactor.callFromThread(self._finished)

    def _connectionTo(self, path: Path) -> sqlite3.Connection | None:
        """The connection to ``path`` (made now if need be), or None if the file is not ready.
        Raises StoreError if the thread could not connect to its home file."""
        if self._openError is not None:
            raise self._openError
        connection = self._connections.get(path)
        if connection is None:
            connection = self._connect(path)
            if connection is not None:
                self._connections[path] = connection
        return connection

    def _take(self) -> tuple[list[_Request], bool]:
        """Block for the next request, then take those already waiting as well, at most
        ``takeLimit`` in all: their answers reach the reactor thread in one call (a status
        request's two reads, asked for at once, are one wake of the reactor, not two).
        Returns (requests, whether to stop after them)."""
        return self._takeAfter([])

    def _takeAfter(self, taken: Sequence[_Request]) -> tuple[list[_Request], bool]:
        """:meth:`_take`, after ``taken`` (taken already, their turn not yet come: then what
        is waiting, without blocking)."""
        requests = list(taken)
        try:
            item = self._queue.get_nowait() if requests else self._queue.get()
        except queue.Empty:
            return requests, False
        while item is not _STOP:
            assert isinstance(item, _Request)
            requests.append(item)
            if len(requests) >= self.takeLimit:
                return requests, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return requests, False
        return requests, True

    def _parts(self, requests: list[_Request]) -> list[list[_Request]]:
        """The requests taken together, in the parts to run and answer one after another."""
        return [requests] if requests else []

    def _execute(self, requests: Sequence[_Request]) -> list[_Outcome]:
        return [self._runOn(r.target, r) if r.target else self._runEach(r) for r in requests]

    def _readyConnectionTo(self, path: Path) -> sqlite3.Connection:
        """The connection to ``path``; raises StoreError if the file is not ready."""
        connection = self._connectionTo(path)
        if connection is None:
            raise StoreError(f"sqlite store: {str(path)!r} is not ready")
        return connection

    def _runOn(self, target: Path, request: _Request) -> _Outcome:
        try:
            connection = self._readyConnectionTo(target)
        except Exception as e:
            return _Outcome(request, False, asStoreError(e))
        return self._runOne(connection, request)

    def _runEach(self, request: _Request) -> _Outcome:
        """Run ``request`` on every file that is ready; one outcome with the list of
        ``(file, result)``, or the first failure."""
        results = []
        try:
            files = list(self._files())
        except Exception as e:
            return _Outcome(request, False, asStoreError(e))
        for path in files:
            try:
                connection = self._connectionTo(path)
            except Exception as e:
                return _Outcome(request, False, asStoreError(e))
            if connection is None:
                continue
            outcome = self._runOne(connection, request)
            if not outcome.ok:
                return outcome
            results.append((path, outcome.value))
        return _Outcome(request, True, results)

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
                # What the caller is told of and expects to happen now and then is no error
                # of the store's.
                if not isinstance(error, AlreadyExists | NotFound | LeaseLost):
                    self.log.error(
                        "{thread}: store operation failed: {error}",
                        thread=self._name,
                        error=str(error),
                    )
                outcome.request.deferred.errback(error)


class InlineReader(DatabaseThread):
    """
    The reads of a process that serves nothing but reads (the web process,
    :mod:`mailrelay.workers.web`), run at once on the calling thread -- the reactor's -- with
    connections of its own: a status request then costs no hand-over to a thread and back
    (two wake-ups, each a wait for a core on a busy machine). Its reactor is blocked for the
    read, an indexed lookup of microseconds (WAL: a reader never waits for a writer); the
    requests would wait for the one reader thread in turn anyway. The same interface as
    :class:`DatabaseThread`, whose run methods it calls; no thread is started.
    """

    def start(self) -> Deferred[None]:
        assert self._state == "new", "a reader starts once"
        self._state = "running"
        try:
            self._readyConnectionTo(self._home)
        except BaseException as e:
            self._openError = asStoreError(e)
            return _failed(self._openError)
        return succeed(None)

    def _submit(self, work: Work, target: Path | None) -> Deferred[Any]:
        if self._state != "running":
            return _failed(StoreError("store is not open"))
        request = _Request(work, Deferred(), target)
        self._deliver(self._execute([request]))
        return request.deferred

    def stop(self) -> Deferred[None]:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()
        self._state = "stopped"
        return succeed(None)


class GroupCommitThread(DatabaseThread):
    """
    The single writer, with group commit.

    It blocks for the first request, then takes every request already waiting (at most
    ``groupLimit``). The requests for one file -- in the relay, nearly all of them are enqueues
    for the home file -- run in one ``BEGIN IMMEDIATE`` transaction and commit once. A group
    that is one batch runs as it is; if it fails, or if the group is anything else, each request
    (or run of batched requests) runs inside its own SAVEPOINT, so a request that fails is
    rolled back alone and the others go on. Only after COMMIT returned (with
    ``synchronous=FULL``: after the fsync) does any caller hear of success. If the transaction
    as a whole fails (COMMIT fails, or SQLite abandons the transaction, e.g. disk full), it is
    rolled back and each request is retried in a transaction of its own, so one bad request
    fails alone. A request for every file runs in a transaction of its own on each file.

    ``commits`` counts successful COMMITs, so one can see the grouping at work.
    """

    def __init__(
        self,
        name: str,
        connect: Connect,
        reactor: IReactorThreads,
        home: Path,
        files: Files,
        groupLimit: int = 256,
    ) -> None:
        super().__init__(name, connect, reactor, home, files)
        self.takeLimit = groupLimit
        self.commits = 0
        # Each counter has one writer, so neither loses a count: Ahead writes submitted (on
        # the reactor thread) and taken (here). Unequal: one waits in the queue.
        self._aheadSubmitted = 0
        self._aheadTaken = 0
        self._unrun: list[_Request] = []  # what a group left to run when it gave way

    def _submit(self, work: Work, target: Path | None) -> Deferred[Any]:
        if isinstance(work, Ahead) and self._state == "running":
            self._aheadSubmitted += 1
        return super()._submit(work, target)

    def _take(self) -> tuple[list[_Request], bool]:
        """What the last group left to run, then what is waiting."""
        unrun, self._unrun = self._unrun, []
        requests, stop = self._takeAfter(unrun)
        self._aheadTaken += sum(isinstance(r.work, Ahead) for r in requests[len(unrun) :])
        return requests, stop

    def _aheadWaiting(self) -> bool:
        return self._aheadSubmitted != self._aheadTaken

    def _parts(self, requests: list[_Request]) -> list[list[_Request]]:
        """The :class:`Ahead` requests first, committed and answered on their own."""
        ahead = [r for r in requests if isinstance(r.work, Ahead)]
        if not ahead or len(ahead) == len(requests):
            return super()._parts(requests)
        return [ahead, [r for r in requests if not isinstance(r.work, Ahead)]]

    def _execute(self, requests: Sequence[_Request]) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        for target, group in _byTarget(requests):
            if self._unrun or (outcomes and self._aheadWaiting()):
                self._unrun.extend(group)  # after the Ahead write, in the order taken
            elif target is None:
                outcomes.extend(self._runEach(r) for r in group)
            else:
                outcomes.extend(self._commitGroup(target, group))
        return outcomes

    def _commitGroup(self, target: Path, requests: Sequence[_Request]) -> list[_Outcome]:
        """
        Run ``requests`` on ``target`` in one transaction. A group that is one batch runs
        without savepoints first; if that fails, the group runs again with each request (or
        batch) in a savepoint of its own, and if that fails too, one by one.
        """
        if len(requests) == 1:
            return [self._runOn(target, requests[0])]
        try:
            connection = self._readyConnectionTo(target)
        except Exception as e:
            error = asStoreError(e)
            return [_Outcome(r, False, error) for r in requests]
        runs = _batchRuns(requests)
        if len(runs) == 1:
            ((runBatch, _),) = runs
            assert runBatch is not None
            try:
                return self._runLean(connection, requests, runBatch)
            except Exception:
                _rollbackQuietly(connection)
        try:
            return self._runGroup(connection, runs)
        except Exception:
            _rollbackQuietly(connection)  # before another process may write
        return [self._runOne(connection, r) for r in requests]

    def _runLean(
        self, connection: sqlite3.Connection, requests: Sequence[_Request], runBatch: RunBatch
    ) -> list[_Outcome]:
        """One batch as the whole transaction, without a savepoint (whose journal would copy
        every page the batch touches): the common case, consecutive enqueues."""
        connection.execute("BEGIN IMMEDIATE")
        if runBatch is InSequence.runBatch and not isinstance(requests[0].work, Ahead):
            results: list[Any] = []
            for request in requests:
                if results and self._aheadWaiting():
                    break
                results.append(request.work(connection))
        else:
            results = list(runBatch(connection, [r.work for r in requests]))
        connection.execute("COMMIT")
        self.commits += 1
        self._unrun = list(requests[len(results) :])
        return [_Outcome(r, True, v) for r, v in zip(requests, results, strict=False)]

    def _runGroup(
        self, connection: sqlite3.Connection, runs: Sequence[tuple[RunBatch | None, list[_Request]]]
    ) -> list[_Outcome]:
        connection.execute("BEGIN IMMEDIATE")
        outcomes: list[_Outcome] = []
        unrun: list[_Request] = []
        for runBatch, run in runs:
            if unrun or (outcomes and self._aheadWaiting()):
                unrun += run
            else:
                batch = runBatch if len(run) > 1 else None
                outcomes.extend(self._inSavepoint(connection, run, batch))
        connection.execute("COMMIT")
        self.commits += 1
        self._unrun = unrun
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
        """One request in a transaction of its own."""
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


class SplitWriter:
    """
    The writes of a process that shares the files with others, in two writer threads
    (:class:`GroupCommitThread`): ``own`` for the files the process owns (``owns``: its
    enqueues, its deliveries' claims and outcomes), ``foreign`` for the files other processes
    own, which it writes to now and then (the main process's report outbox and expiry in
    the workers' files, a worker's account data in the main file). A write to another
    process's file waits for that process's write lock -- seconds, behind its commits, when
    it is busy -- and then holds up only the writes queued behind it on ``foreign``, never
    the process's own. The interface of one :class:`GroupCommitThread`.
    """

    def __init__(
        self,
        own: GroupCommitThread,
        foreign: GroupCommitThread,
        owns: Callable[[Path], bool],
        files: Files,
    ) -> None:
        self._own = own
        self._foreign = foreign
        self._owns = owns
        self._files = files
        self._stopping = False

    @property
    def commits(self) -> int:
        return self._own.commits + self._foreign.commits

    async def _start(self) -> None:
        await self._own.start()  # first: it makes or upgrades the home file
        if not self._stopping:
            await self._foreign.start()

    def start(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start())

    async def _stop(self) -> None:
        self._stopping = True
        await self._foreign.stop()
        await self._own.stop()

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    def submit(self, work: Work, target: Path | None = None) -> Deferred[Any]:
        if target is None or self._owns(target):
            return self._own.submit(work, target)
        return self._foreign.submit(work, target)

    def submitEach(self, work: Work) -> Deferred[list[tuple[Path, Any]]]:
        """``work`` on every file, each by the thread that writes it, both at once; the
        results in the order of ``files``, or the first failure."""
        return Deferred.fromCoroutine(self._each(work))

    async def _each(self, work: Work) -> list[tuple[Path, Any]]:
        both = [self._own.submitEach(work), self._foreign.submitEach(work)]
        try:
            own, foreign = await gatherResults(both, consumeErrors=True)
        except FirstError as e:
            e.subFailure.raiseException()
        results = dict(own + foreign)
        return [(file, results[file]) for file in self._files() if file in results]


def _batchRuns(requests: Sequence[_Request]) -> list[tuple[RunBatch | None, list[_Request]]]:
    """``requests`` cut into runs: consecutive works with the same ``runBatch`` together, each
    other work a run of its own (with None)."""
    runs: list[tuple[RunBatch | None, list[_Request]]] = []
    for request in requests:
        runBatch: RunBatch | None = getattr(request.work, "runBatch", None)
        if runBatch is not None and runs and runs[-1][0] is runBatch:
            runs[-1][1].append(request)
        else:
            runs.append((runBatch, [request]))
    return runs


def _byTarget(requests: Sequence[_Request]) -> list[tuple[Path | None, list[_Request]]]:
    """The requests grouped by the file they are for, each group in the order submitted (the
    groups in the order of their first request). Requests for every file stay on their own,
    in place: they may touch any file."""
    groups: list[tuple[Path | None, list[_Request]]] = []
    byFile: dict[Path, list[_Request]] = {}
    for request in requests:
        if request.target is None:
            groups.append((None, [request]))
            byFile = {}  # what comes after it must run after it
            continue
        group = byFile.get(request.target)
        if group is None:
            group = byFile[request.target] = []
            groups.append((request.target, group))
        group.append(request)
    return groups


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
