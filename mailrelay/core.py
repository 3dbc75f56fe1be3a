"""
The relay core: what every relay process builds the same way -- the store (with the service
that opens and closes it), the auth threads, the portal, the login throttle, the connection
counter and the per-listener protocol factories. The main process (:mod:`mailrelay.tap`) and
each intake worker (:mod:`mailrelay.workers.child`) build one.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailrelay.auth.realm import makePortal
from mailrelay.auth.throttle import (
    FAILED_LOGINS_PER_ACCOUNT,
    FAILED_LOGINS_PER_CLIENT,
    LoginThrottle,
)
from mailrelay.config import Config, ConfigError, ListenerConfig
from mailrelay.interfaces import IStore, StoreError
from mailrelay.smtp.listener import ConnectionCounter, listenerFactory, listenerSettings
from mailrelay.smtp.sessions import SessionRegistry
from mailrelay.store import makeStore
from mailrelay.submission import Submissions
from mailrelay.tls import ReloadableTLS, certificatePaths, contextFromPEM, readPEM

log = Logger()


class StoreService(Service):
    """Opens the store when the service starts and closes it (after the listeners) on stop.

    Listening sockets are bound before the store is open (privilegedStartService runs first);
    :meth:`whenReady` is how sessions wait for it before they greet anyone.
    """

    def __init__(self, store: IStore, reactor: Any) -> None:
        self.store = store
        self._reactor = reactor
        self.ready = False
        self._waiting: list[Deferred[None]] = []

    def whenReady(self) -> Deferred[None]:
        """A Deferred that fires once the store is open (at once if it is)."""
        if self.ready:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def startService(self) -> None:
        super().startService()
        d = self.store.open()
        d.addCallbacks(self._opened, self._failed)

    def _opened(self, _: object) -> None:
        self.ready = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def _failed(self, failure: Any) -> None:
        log.failure("cannot open the store; stopping", failure)
        # twistd itself always exits 0 once the reactor stops; a service manager must see
        # this start fail (systemd's Restart=on-failure), so leave with status 1 once the
        # shutdown (listeners closed, logs written) is complete.
        self._reactor.addSystemEventTrigger("after", "shutdown", _exitFailed)
        self._reactor.stop()

    def stopService(self) -> Any:
        super().stopService()
        return self.store.close()


def _exitFailed() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


class ThreadPoolService(Service):
    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


@dataclass(frozen=True)
class RelayCore:
    """What every relay process builds the same way: the store and what stands on it."""

    store: IStore
    portal: Portal
    throttle: LoginThrottle
    storeService: StoreService
    connections: ConnectionCounter
    listenerFactory: Callable[[ListenerConfig], IProtocolFactory]
    tlsPEM: tuple[bytes, bytes] | None  # what the TLS context was made of (None: no TLS)
    submissions: Submissions
    # What a reload changes (mailrelay.lifecycle.LiveSettings): the TLS context new sessions
    # take, and the factories made so far (their settings are what new sessions get).
    tls: ReloadableTLS | None = None
    factories: list[Any] = field(default_factory=list)


def buildCore(
    config: Config,
    reactor: Any,
    root: MultiService,
    processIndex: int = 0,
    tlsPEM: tuple[bytes, bytes] | None = None,
    publishConnections: Callable[[int], None] | None = None,
    sessions: SessionRegistry | None = None,
    readsOnly: bool = False,
) -> RelayCore:
    """
    The store (started first, stopped last), the auth threads, the portal and the per-listener
    protocol factories of relay process ``processIndex`` (0: the main one), added to ``root``.

    With ``config.workers`` processes, the limits kept in memory are shared out: each process
    allows its part of the connections, of the failed logins per address and of each account's
    rate, so the relay as a whole never allows more than configured.

    ``tlsPEM`` (certificate chain, key) is what a worker was handed by the main process; the
    main process reads the configured files (or makes the self-signed pair) itself.
    ``publishConnections`` is told this process's count of open connections at each change
    (its entry in the workers' shared load table). ``sessions`` is where the sessions are
    kept for a drain. ``readsOnly``: the process only reads the store (the web process).
    """
    spoolDir = config.dataPath / "spool"
    try:
        # data_dir before its spool: mkdir makes missing parents with the default mode (0755
        # under the usual umask), and data_dir holds password hashes and messages.
        for directory in (config.dataPath, spoolDir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        store = makeStore(config, reactor, processIndex, readsOnly)
    except OSError as e:
        raise SystemExit(f"mailrelay: data_dir {config.data_dir!r}: {e.strerror or e}") from None
    except (StoreError, ConfigError) as e:
        raise SystemExit(f"mailrelay: {e}") from None

    storeService = StoreService(store, reactor)
    storeService.setServiceParent(root)
    authPool = ThreadPool(minthreads=1, maxthreads=2, name="mailrelay-auth")
    ThreadPoolService(authPool).setServiceParent(root)

    tlsContext = None
    if any(listener.security != "none" for listener in config.listeners):
        try:
            if tlsPEM is None:
                tlsPEM = readPEM(*certificatePaths(config))
            tlsContext = ReloadableTLS(contextFromPEM(*tlsPEM))
        except (ValueError, OSError) as e:
            raise SystemExit(f"mailrelay: TLS: {e}") from None
    submissions = Submissions(store, config, reactor)
    portal, realm = makePortal(store, submissions, reactor, authPool)
    throttle = LoginThrottle(
        reactor.seconds,
        maxFailures=config.perProcess(FAILED_LOGINS_PER_CLIENT),
        maxAccountFailures=config.perProcess(FAILED_LOGINS_PER_ACCOUNT),
    )
    connections = ConnectionCounter(
        config.perProcess(config.limits.max_connections),
        config.perProcess(config.limits.max_connections_per_client),
        publish=publishConnections,
    )

    def factory(listener: ListenerConfig) -> IProtocolFactory:
        settings = listenerSettings(
            listener,
            hostname=config.hostname,
            limits=config.limits,
            portal=portal,
            clock=reactor,
            throttle=throttle,
            tlsContext=tlsContext,
            networkLogin=realm.networkLogin,
            spoolDir=str(spoolDir),
            whenReady=storeService.whenReady,
            connections=connections,
            sessions=sessions,
        )
        made = listenerFactory(settings)
        factories.append(getattr(made, "wrappedFactory", made))  # inside implicit TLS
        return made

    factories: list[Any] = []
    return RelayCore(
        store,
        portal,
        throttle,
        storeService,
        connections,
        factory,
        tlsPEM,
        submissions,
        tlsContext,
        factories,
    )


GIL_SWITCH_INTERVAL = 0.001
"""Seconds a thread may keep the GIL while another waits for it (Python's default: 0.005)."""


def shortenGILTurns() -> None:
    """
    Let the store's writer thread have the GIL sooner. It gives the GIL up around every
    SQLite call and needs it back to go on; with Python's default 5 ms turns it waits behind
    the busy reactor thread while every session waits for its commit. With 1 ms turns one
    process accepted 15-18% more 2 KiB messages on 10 sessions (benchmarks/RESULTS.md);
    100 KiB messages and 500 sessions were unchanged.
    """
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)


GC_THRESHOLDS = (10_000, 10, 10)
"""Python's cyclic garbage collector runs when this many more objects were made than freed
(its default: 700), and its older generations after 10 of the younger one's runs each. A
delivery's Deferreds, coroutines and protocol state live for milliseconds to seconds; at the
default, collections ran hundreds of times a second and moved them into the old generation,
whose collections then took 35-50 ms each, stalling every connection and status request of
the process (benchmarks/RESULTS.md)."""


def collectGarbageLessOften() -> None:
    gc.set_threshold(*GC_THRESHOLDS)


def freezeStartHeap() -> None:
    """
    Keep what the process made to start (modules, the service tree, caches: nearly all of it
    lives as long as the process) out of the collector's runs from now on, so that a run of
    the old generation looks only at what serving made since (``gc.freeze``). Called once the
    relay serves; what is garbage already is collected first.
    """
    gc.collect()
    gc.freeze()
    log.info(
        "{count} objects of the start kept out of garbage collection", count=gc.get_freeze_count()
    )
