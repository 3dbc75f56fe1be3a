"""
The main process's side of the worker processes: start them with the listening sockets,
restart one that ends, stop them with the relay. The web process
(:mod:`mailrelay.workers.web`), when the web endpoint has one, is started, watched and
stopped the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import InvalidLogLevelError, Logger, LogLevel
from twisted.python.failure import Failure

from mailrelay import metrics
from mailrelay.config import Config, configFromSource
from mailrelay.maillog import emitPreformatted
from mailrelay.workers.balance import ABSENT, LoadTable, balanceAccepts

RESTART_DELAY = 1.0
"""Seconds before a worker that ended is started again (doubled while it keeps failing)."""
MAX_RESTART_DELAY = 60.0
STABLE_AFTER = 30.0
"""A worker that ran this long before it ended is restarted after RESTART_DELAY again."""
STOP_TIMEOUT = 15.0
"""Seconds a worker has, beyond its drain (``[limits] drain_timeout``), to finish its writes
and exit before it is killed."""
READY_TIMEOUT = 60.0
"""Seconds a new worker has to open its store and serve before it is killed (and restarted)."""
SILENCE_TIMEOUT = 15.0
"""Seconds a serving worker may go without a word (it sends metrics every second): a worker
silent for longer is hung, and is killed (and restarted)."""
CHECK_INTERVAL = 5.0
SETUP_FD = 3
"""The worker's descriptor of the pipe that carries its setup (configuration, TLS files)."""
LOAD_FD = 4
"""The worker's descriptor of the shared load table (:class:`~.balance.LoadTable`)."""
FIRST_LISTENER_FD = 10
"""The worker's descriptor of the first listening socket (the next ones follow)."""
RELOAD_COMMAND = b"reload "
"""Starts the line on a worker's stdin that carries a reloaded :class:`WorkerSetup`."""
MAX_LOG_LINE = 16384
MAX_CONTROL_LINE = 1 << 20

_relayLog = Logger(namespace="mailrelay.workers.pool.WorkerProcess")
"""What a worker's lines are relayed as: the namespace they always had."""


class WorkerProcess(ProcessProtocol):
    """One running worker: relays its log lines, tells the pool when it ends."""

    log = Logger()

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.name = "web process" if index == pool.webIndex else f"worker {index}"
        self.startedAt = pool.reactor.seconds()
        self.ended: Deferred[None] = Deferred()
        self.ready = False
        self.lastHeard = self.startedAt
        self.pid: int | None = None
        self._partial = b""
        self._control = b""

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)

    def outReceived(self, data: bytes) -> None:
        # stdout carries control lines (stderr the log): "ready" once the worker serves, then
        # "metrics <json>" about once a second.
        *lines, self._control = (self._control + data).split(b"\n")
        if len(self._control) > MAX_CONTROL_LINE:
            self._control = b""
        if lines:
            self.lastHeard = self.pool.reactor.seconds()
        for line in lines:
            if line == b"ready" and not self.ready:
                self.ready = True
                self.log.info("{name} serving (pid {pid})", name=self.name, pid=self.pid)
                self.pool.workerReady(self)
            elif line.startswith(b"metrics "):
                try:
                    metrics.workerMetrics.workers[self.index] = json.loads(line[8:])
                except ValueError:
                    self.log.warn("{name}: unreadable metrics", name=self.name)

    def errReceived(self, data: bytes) -> None:
        self._relay(data)

    def _relay(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > MAX_LOG_LINE:
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            text = line.decode("utf-8", "replace").rstrip()
            if not text:
                continue
            if text.startswith("{") and self._relayJSON(text):
                continue
            # PREFORMATTED: a worker's every message comes through here, and Twisted's
            # formatter would cost the main process 15 us a line.
            relayed = f"{self.name}: {text}"
            if "#error]" in text or "#critical]" in text or text.startswith("mailrelay:"):
                emitPreformatted(_relayLog, LogLevel.error, relayed, index=self.index)
            else:
                emitPreformatted(_relayLog, LogLevel.info, relayed, index=self.index)

    def _relayJSON(self, text: str) -> bool:
        """Re-emit a worker's ``--log-format json`` line as an event of this process, its
        fields kept and ``worker`` added; False if ``text`` is not such a line."""
        try:
            document = json.loads(text)
            level = LogLevel.levelWithName(document.pop("level", "info"))
        except (ValueError, InvalidLogLevelError, AttributeError):
            return False
        if not isinstance(document, dict):
            return False
        fields = {k: v for k, v in document.items() if k not in ("time", "namespace")}
        fields["text"] = document.get("text", "")
        fields["worker"] = self.index
        fields["process"] = self.name
        namespace = document.get("namespace") or "mailrelay.workers"
        Logger(namespace=namespace).emit(level, "{process}: {text}", **fields)
        return True

    def processEnded(self, reason: Failure) -> None:
        try:
            if self._partial:
                self._relay(b"\n")
            metrics.workerMetrics.retire(self.index)
            self.pool.workerEnded(self, reason)
        finally:
            self.ended.callback(None)  # whatever happened above: the pool's stop waits on it

    def stop(self) -> None:
        """Ask the worker to finish (it stops accepting, completes its writes, exits)."""
        self._signal("TERM")

    def kill(self) -> None:
        self._signal("KILL")

    def _signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)  # type: ignore[union-attr]
        except (ProcessExitedAlready, OSError):
            pass  # it has ended already


@dataclass(frozen=True)
class WorkerSetup:
    """What the main process read at its start and hands every worker through a pipe, so
    that all processes run the same configuration however the files change later, and a
    worker needs no right to read them (it runs after ``--uid``)."""

    configSource: str | None  # the TOML text; None: the built-in defaults
    tlsPEM: tuple[bytes, bytes] | None  # certificate chain and key; None: no TLS listener
    logFormat: str = "text"  # the log's format: "text" or "json" (mailrelay.maillog)
    processes: int = 0  # the relay's process count as the main process decided it ("auto")

    def encode(self) -> bytes:
        pem = None if self.tlsPEM is None else [part.decode("ascii") for part in self.tlsPEM]
        document = {
            "config": self.configSource,
            "tls": pem,
            "log": self.logFormat,
            "processes": self.processes,
        }
        return json.dumps(document).encode()

    @classmethod
    def decode(cls, data: bytes) -> WorkerSetup:
        document = json.loads(data)
        pem = document["tls"]
        tlsPEM = None if pem is None else (pem[0].encode("ascii"), pem[1].encode("ascii"))
        processes = int(document.get("processes", 0))
        return cls(document["config"], tlsPEM, document.get("log", "text"), processes)

    def config(self) -> Config:
        """The configuration it carries, with the main process's count of processes.
        Raises ValueError (ConfigError) if it is not usable."""
        config = configFromSource(self.configSource)
        if self.processes:
            config = dataclasses.replace(config, workers=self.processes)
        return config


@dataclass(frozen=True)
class WebProcessSetup:
    """What the web process is started with: the main process's listener of the web endpoint
    (its socket is handed over; the main process accepts on it only while the web process
    does not serve) and its private listener on the loopback interface, where the web process
    forwards what it does not answer itself. Both are ListenerServices, bound before the pool
    starts."""

    listener: Any
    forward: Any


class WorkerPool(Service):
    """
    ``count`` worker processes (indexes 1..count; the main process is 0), each running
    ``python -m mailrelay.workers.child`` with ``setup`` and the listening sockets of
    ``listeners`` (the main process's ListenerServices, bound before this service starts).
    They are started once ``whenReady`` fires (the main process's store is open: its schema
    is up to date before any worker opens it).

    A worker that ends while the relay runs is logged and started again after a delay that
    doubles while it keeps ending soon after its start. One that does not serve within
    ``READY_TIMEOUT``, or falls silent for ``SILENCE_TIMEOUT`` (hung), is killed and so
    started again. When the relay stops, each worker gets SIGTERM (and is killed if it has
    not exited after ``STOP_TIMEOUT``); the stop completes once all of them have exited. A
    worker also stops by itself when the main process is gone (its stdin, a pipe from here,
    reaches end of file).

    With ``web``, the pool runs the web process as well (index ``count + 1``), started,
    watched and stopped like a worker; while it serves, the main process stops accepting on
    the web endpoint, and accepts again when it ends.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        *,
        count: int,
        setup: WorkerSetup,
        listeners: Sequence[Any],
        loads: LoadTable | None,
        openConnections: Callable[[], int],
        whenReady: Callable[[], Deferred[Any]] | None = None,
        executable: str = sys.executable,
        stopTimeout: float = STOP_TIMEOUT,
        web: WebProcessSetup | None = None,
    ) -> None:
        self.reactor = reactor
        self.count = count
        self.web = web
        self.webIndex = count + 1 if web is not None else None
        self.setup = setup
        self.listeners = list(listeners)
        self.loads = loads
        self.openConnections = openConnections
        self.whenReady = whenReady
        self.executable = executable
        self.stopTimeout = stopTimeout
        self.workers: dict[int, WorkerProcess] = {}
        self.starts = 0  # workers started so far, restarts included
        self._restartDelay: dict[int, float] = {}
        self._pendingRestarts: dict[int, Any] = {}
        self._checks = LoopingCall(self._checkWorkers)
        self._checks.clock = reactor

    def serving(self) -> tuple[int, int]:
        """(intake processes configured, serving now), the main process counted in."""
        serving = sum(w.ready for i, w in self.workers.items() if i != self.webIndex)
        return (self.count + 1, 1 + serving)

    def webServing(self) -> bool:
        """Whether the web process serves now."""
        web = None if self.webIndex is None else self.workers.get(self.webIndex)
        return web is not None and web.ready

    def startService(self) -> None:
        super().startService()
        loads = self.loads
        if loads is not None:
            for listener in self.listeners:
                balanceAccepts(listener.port, self.reactor, self.openConnections, loads.least)
        if self.whenReady is None:
            self._startAll()
        else:
            self.whenReady().addCallback(lambda _: self._startAll())

    def _startAll(self) -> None:
        if not self.running:
            return
        for index in range(1, self.count + 1):
            self._start(index)
        if self.webIndex is not None:
            self._start(self.webIndex)
        self._checks.start(CHECK_INTERVAL, now=False)

    def command(self, index: int) -> tuple[list[str], dict[int, Any]]:
        """The worker's argument list and its file descriptors (stdio, the setup pipe, the
        listening sockets from FIRST_LISTENER_FD on)."""
        # -P: not the working directory (data_dir under the shipped unit) first on sys.path,
        # where a file named like a module the worker imports would run in it.
        if index == self.webIndex:
            return self._webCommand()
        assert self.loads is not None
        args = [self.executable, "-P", "-m", "mailrelay.workers.child", "--index", str(index)]
        childFDs: dict[int, Any] = {0: "w", 1: "r", 2: "r", SETUP_FD: "w", LOAD_FD: self.loads.fd}
        for position, listener in enumerate(self.listeners):
            port = listener.port
            if port is None:
                raise RuntimeError(f"listener {listener.description} is not bound")
            childFD = FIRST_LISTENER_FD + position
            childFDs[childFD] = port.fileno()
            args += ["--listener", f"{position}:{childFD}:{int(port.socket.family)}"]
        return args, childFDs

    def _webCommand(self) -> tuple[list[str], dict[int, Any]]:
        """The web process's argument list and file descriptors (stdio, the setup pipe, the web
        endpoint's socket)."""
        assert self.web is not None
        port, forward = self.web.listener.port, self.web.forward.port
        if port is None or forward is None:
            raise RuntimeError("the web listeners are not bound")
        args = [self.executable, "-P", "-m", "mailrelay.workers.web"]
        args += ["--listener", f"0:{FIRST_LISTENER_FD}:{int(port.socket.family)}"]
        args += ["--forward", str(forward.getHost().port)]
        childFDs = {0: "w", 1: "r", 2: "r", SETUP_FD: "w", FIRST_LISTENER_FD: port.fileno()}
        return args, childFDs

    def workerReady(self, worker: WorkerProcess) -> None:
        """A process serves: the web process takes the web endpoint over."""
        if worker.index == self.webIndex and self.web is not None:
            self.web.listener.port.stopReading()

    def _start(self, index: int) -> None:
        self._pendingRestarts.pop(index, None)
        if not self.running:
            return
        worker = WorkerProcess(self, index)
        try:
            args, childFDs = self.command(index)
            # Only the main process speaks to systemd (NotifyAccess=main).
            env = {
                k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))
            }
            transport = self.reactor.spawnProcess(
                worker, self.executable, args, env=env, childFDs=childFDs
            )
        except Exception as e:
            self.log.error("{name} cannot be started: {error}", name=worker.name, error=e)
            self._startLater(index, worker)
            return
        transport.writeToChild(SETUP_FD, self.setup.encode())
        transport.closeChildFD(SETUP_FD)
        self.workers[index] = worker
        self.starts += 1
        self.log.info("{name} started (pid {pid})", name=worker.name, pid=worker.pid)

    def _startLater(self, index: int, worker: WorkerProcess) -> None:
        """Start worker ``index`` again, after a delay that doubles while it keeps failing
        soon after its start."""
        ranFor = self.reactor.seconds() - worker.startedAt
        previous = self._restartDelay.get(index)
        if previous is None or ranFor >= STABLE_AFTER:
            delay = RESTART_DELAY
        else:
            delay = min(previous * 2, MAX_RESTART_DELAY)
        self._restartDelay[index] = delay
        self._pendingRestarts[index] = self.reactor.callLater(delay, self._start, index)

    def _checkWorkers(self) -> None:
        """Kill a worker that has not served in time or has gone silent (it is restarted)."""
        now = self.reactor.seconds()
        for worker in list(self.workers.values()):
            if not worker.ready and now - worker.startedAt > READY_TIMEOUT:
                problem = f"not serving after {READY_TIMEOUT:.0f} s"
            elif worker.ready and now - worker.lastHeard > SILENCE_TIMEOUT:
                problem = f"silent for {now - worker.lastHeard:.0f} s"
            else:
                continue
            self.log.error(
                "{name} (pid {pid}) {problem}: killing it",
                name=worker.name,
                pid=worker.pid,
                problem=problem,
            )
            worker.kill()

    def reload(self, configSource: str | None, tlsPEM: tuple[bytes, bytes] | None) -> None:
        """Hand a reloaded configuration and TLS files (validated by the main process) to
        every worker (a ``reload`` line on its stdin), and to the workers started later."""
        self.setup = dataclasses.replace(self.setup, configSource=configSource, tlsPEM=tlsPEM)
        line = RELOAD_COMMAND + self.setup.encode() + b"\n"
        for worker in self.workers.values():
            try:
                worker.transport.writeToChild(0, line)  # type: ignore[union-attr]
            except (OSError, KeyError, AttributeError) as e:
                self.log.warn("{name}: reload not sent: {error}", name=worker.name, error=e)

    def workerEnded(self, worker: WorkerProcess, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
            if worker.index == self.webIndex:
                self._webEnded(worker)
            elif self.loads is not None:
                self.loads.set(worker.index, ABSENT)  # its connections are gone with it
        if not self.running:
            return
        self._startLater(worker.index, worker)
        self.log.error(
            "{name} (pid {pid}) ended: {reason}; starting it again in {delay:.0f} s",
            name=worker.name,
            pid=worker.pid,
            reason=reason.getErrorMessage(),
            delay=self._restartDelay[worker.index],
        )

    def _webEnded(self, worker: WorkerProcess) -> None:
        """The web process is gone: the main process answers the web endpoint meanwhile, and
        while the relay stops, until its own listener closes."""
        port = None if self.web is None else self.web.listener.port
        if worker.ready and port is not None and port.connected:
            port.startReading()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._checks.running:
            self._checks.stop()
        for call in self._pendingRestarts.values():
            if call.active():
                call.cancel()
        self._pendingRestarts.clear()
        running = list(self.workers.values())
        for worker in running:
            worker.stop()

        def killRemaining() -> None:
            for worker in running:
                worker.kill()

        kill = self.reactor.callLater(self.stopTimeout, killRemaining)
        done = DeferredList([w.ended for w in running])

        def stopped(result: Any) -> Any:
            if kill.active():
                kill.cancel()
            return result

        return done.addBoth(stopped)
