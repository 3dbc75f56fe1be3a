"""
A worker process: ``python -m mailrelay.workers.child --index N --listener
POSITION:FD:FAMILY ...``, started by :class:`~mailrelay.workers.pool.WorkerPool`.

It builds the same relay core as the main process (:func:`mailrelay.core.buildCore`) and
serves SMTP on the listening sockets it inherited: ``POSITION`` is the listener's place in the
configuration, ``FD`` the inherited descriptor, ``FAMILY`` its address family. It logs to
stderr (the main process relays the lines into its own log) and stops on SIGTERM, or when its
stdin reaches end of file because the main process is gone. Its configuration and TLS files
come from the main process through a pipe (:class:`~mailrelay.workers.pool.WorkerSetup`),
as the main process read them at its start.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IStreamServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.stdio import StandardIO
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, globalLogBeginner
from zope.interface import implementer

import mailrelay.smtp.protocol  # noqa: F401  (imported now, not at the first session)
from mailrelay import metrics
from mailrelay.config import Config, ConfigError, proxied
from mailrelay.core import (
    RelayCore,
    ThreadPoolService,
    buildCore,
    collectGarbageLessOften,
    freezeStartHeap,
    shortenGILTurns,
)
from mailrelay.delivery.side import DeliverySide
from mailrelay.files import keepFilesPrivate
from mailrelay.lifecycle import LiveSettings, RelayRoot, SignalService, deliveryChanged
from mailrelay.maillog import jsonLinesObserver, textLinesObserver
from mailrelay.smtp.proxy import ProxyHeaderFactory
from mailrelay.tls import contextFromPEM
from mailrelay.workers.balance import LoadTable, balanceAccepts
from mailrelay.workers.pool import LOAD_FD, RELOAD_COMMAND, SETUP_FD, WorkerSetup

log = Logger()

READY = b"ready\n"
"""Written to stdout (the main process reads it) once the worker's store is open and its
listeners accept: from then on its sessions are served."""
METRICS_INTERVAL = 1.0
"""Seconds between two snapshots of the worker's counters sent to the main process."""


@dataclass(frozen=True)
class InheritedListener:
    position: int
    fd: int
    family: int


def inheritedListener(text: str) -> InheritedListener:
    try:
        position, fd, family = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not POSITION:FD:FAMILY: {text!r}") from None
    return InheritedListener(position, fd, family)


class AdoptedListener(Service):
    """Serves ``factory`` on an inherited listening socket from :meth:`adopt` on (called once
    the worker's store is open: until then the other processes take the new connections)."""

    def __init__(
        self,
        reactor: Any,
        listener: InheritedListener,
        factory: Any,
        openConnections: Callable[[], int],
        leastConnections: Callable[[], int],
        proxyProtocol: bool = False,
    ) -> None:
        self.reactor = reactor
        self.listener = listener
        self.factory = factory
        self.proxyProtocol = proxyProtocol  # a haproxy: listener: PROXY header first
        self.openConnections = openConnections
        self.leastConnections = leastConnections
        self.port: Any = None

    def adopt(self) -> Deferred[None]:
        """Listen; the Deferred fires once this process accepts on the socket."""
        factory = self.factory
        if self.proxyProtocol:
            # As in the main process: the session starts once the PROXY header is read.
            factory = ProxyHeaderFactory(factory, self.reactor)
        endpoint = AdoptedEndpoint(self.reactor, self.listener)
        return endpoint.listen(factory).addCallback(self._listening)

    def _listening(self, port: Any) -> None:
        self.port = port
        # The reactor took a duplicate of the descriptor; the inherited one is not needed.
        os.close(self.listener.fd)
        balanceAccepts(self.port, self.reactor, self.openConnections, self.leastConnections)
        balanceAccepts(self.port, self.reactor, self.openConnections, self.leastConnections)

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()
        return None


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """An endpoint listening on an inherited socket."""

    def __init__(self, reactor: Any, listener: InheritedListener) -> None:
        self.reactor = reactor
        self.listener = listener

    def listen(self, factory: Any) -> Deferred[Any]:
        return maybeDeferred(
            self.reactor.adoptStreamPort, self.listener.fd, self.listener.family, factory
        )


@implementer(IHalfCloseableProtocol)
class MainProcessPipes(Protocol):
    """The worker's stdin and stdout, pipes to and from the main process: stdout carries
    "ready" and the metrics snapshots; stdin carries ``reload`` lines (a new
    :class:`WorkerSetup`), and its end of file means the main process is gone."""

    def __init__(
        self,
        reactor: Any,
        stop: Callable[[], None] | None = None,
        reload: Callable[[WorkerSetup], None] | None = None,
        beforeMetrics: Callable[[], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self._stop = stop
        self._reload = reload
        self._beforeMetrics = beforeMetrics
        self._input = b""

    def dataReceived(self, data: bytes) -> None:
        *lines, self._input = (self._input + data).split(b"\n")
        for line in lines:
            if line.startswith(RELOAD_COMMAND) and self._reload is not None:
                try:
                    setup = WorkerSetup.decode(line[len(RELOAD_COMMAND) :])
                except (ValueError, KeyError, TypeError) as e:
                    log.error("reload: unreadable setup from the main process: {error}", error=e)
                    continue
                self._reload(setup)

    def tellReady(self, _: object = None) -> None:
        if self.transport is not None:
            self.transport.write(READY)

    def sendMetrics(self) -> None:
        if self.transport is not None:
            if self._beforeMetrics is not None:
                self._beforeMetrics()
            document = json.dumps(metrics.snapshot(), separators=(",", ":"))
            self.transport.write(b"metrics " + document.encode() + b"\n")

    def readConnectionLost(self) -> None:
        # The main process is gone (or the reactor is stopping and closes the pipes): stop,
        # unless a stop is under way -- a second reactor.stop() raises ReactorNotRunning.
        if self._stop is not None:
            self._stop()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.readConnectionLost()


def buildWorker(
    config: Config,
    reactor: Any,
    index: int,
    listeners: Sequence[InheritedListener],
    tlsPEM: tuple[bytes, bytes] | None = None,
    loads: LoadTable | None = None,
) -> tuple[RelayRoot, RelayCore, DeliverySide]:
    """The service tree of worker ``index`` (the relay core, the inherited listeners and the
    delivery of what this worker accepts), the core and the delivery side. The tree's stop
    drains like the main process's (mailrelay.lifecycle)."""
    root = RelayRoot(reactor, config.limits.drain_timeout)
    publish = None if loads is None else partial(loads.set, index)
    core = buildCore(
        config,
        reactor,
        root,
        processIndex=index,
        tlsPEM=tlsPEM,
        publishConnections=publish,
        sessions=root.sessions,
    )
    root.last.append(core.storeService)
    root.afterDrain += [s for s in root if isinstance(s, ThreadPoolService)]
    least = loads.least if loads is not None else (lambda: 0)
    for listener in listeners:
        if not 0 <= listener.position < len(config.listeners):
            raise SystemExit(f"mailrelay: worker {index}: no listener {listener.position}")
        endpoint = config.listeners[listener.position].endpoint
        factory = core.listenerFactory(config.listeners[listener.position])
        AdoptedListener(
            reactor,
            listener,
            factory,
            lambda: core.connections.total,
            least,
            proxyProtocol=proxied(endpoint)[0],
        ).setServiceParent(root)
    try:
        side = DeliverySide(
            config, core.store, reactor, core.storeService.whenReady, root, core.submissions
        )
    except ConfigError as e:  # the main process built the same one: not expected here
        raise SystemExit(f"mailrelay: worker {index}: {e}") from None
    return root, core, side


def readSetup(fd: int = SETUP_FD) -> WorkerSetup:
    """The setup the main process writes into the pipe ``fd`` (then closes)."""
    with os.fdopen(fd, "rb") as pipe:
        return WorkerSetup.decode(pipe.read())


def takeSetup(fd: int, processName: str) -> tuple[WorkerSetup, Config]:
    """The setup from the pipe ``fd`` and its configuration, and the log begun on stderr in
    the setup's format (the main process relays the lines); exits if there is no usable
    setup."""
    try:
        setup = readSetup(fd)
        config = setup.config()
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"mailrelay: {processName}: no usable setup: {e}") from None
    observer: Any
    if setup.logFormat == "json":
        observer = jsonLinesObserver(sys.stderr)  # the main process re-emits its events
    else:
        observer = textLinesObserver(sys.stderr, stamped=False)  # stamped as relayed
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    return setup, config


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mailrelay.workers.child",
        description="A mailrelay intake worker (started by the main process, not by hand).",
    )
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listener", type=inheritedListener, action="append", default=[])
    parser.add_argument("--setup-fd", type=int, default=SETUP_FD, help=argparse.SUPPRESS)
    parser.add_argument("--load-fd", type=int, default=LOAD_FD, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    keepFilesPrivate()
    shortenGILTurns()
    collectGarbageLessOften()

    setup, config = takeSetup(args.setup_fd, f"worker {args.index}")

    from twisted.internet import reactor

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until SignalService takes it
    try:
        loads = LoadTable(args.load_fd, config.workers)
    except (OSError, ValueError) as e:
        raise SystemExit(f"mailrelay: worker {args.index}: no load table: {e}") from None
    root, core, side = buildWorker(config, reactor, args.index, args.listener, setup.tlsPEM, loads)
    live = LiveSettings(config, core.tls, core.connections, core.submissions, core.factories)

    def reload(new: WorkerSetup) -> None:
        # The main process validated it; a failure here is still refused, not half-applied.
        try:
            newConfig = new.config()
            context = None if new.tlsPEM is None else contextFromPEM(*new.tlsPEM)
        except ValueError as e:
            log.error("reload refused: {error}", error=str(e))
            return
        old = live.config
        live.apply(newConfig, context)
        if deliveryChanged(old, newConfig):
            Deferred.fromCoroutine(side.switch(live.config)).addErrback(
                lambda f: log.failure("reload: the delivery side", f)
            )
        log.info("reloaded")

    # SIGTERM (from the main process, or from systemd to the whole group) drains, once;
    # SIGHUP changes nothing here: the main process hands the reload over (stdin).
    signals = SignalService(reactor, lambda: None)
    signals.setServiceParent(root)
    control = MainProcessPipes(reactor, signals.stop, reload, side.publishGauges)
    # (typed after the Windows variant, which has no stdin/stdout arguments)
    StandardIO(control, stdin=0, stdout=1, reactor=reactor)  # type: ignore[call-arg]
    root.privilegedStartService()

    def cannotServe(failure: Any) -> None:
        # e.g. an inherited socket that cannot be adopted: end, and be started again.
        sys.stderr.write(f"mailrelay: worker {args.index} cannot serve: {failure.value}\n")
        sys.stderr.flush()
        os._exit(1)

    def serve(_: object) -> Deferred[None]:
        adopted = [s.adopt() for s in root if isinstance(s, AdoptedListener)]
        return gatherResults(adopted, consumeErrors=True).addCallback(serving)

    def serving(_: object) -> None:
        loads.set(args.index, core.connections.total)  # counted among the serving from now
        control.tellReady()
        freezeStartHeap()

    def start() -> None:
        root.startService()
        ready = core.storeService.whenReady()
        ready.addCallback(serve).addErrback(cannotServe)
        LoopingCall(control.sendMetrics).start(METRICS_INTERVAL, now=False)

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", root.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
