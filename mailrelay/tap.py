"""
``twistd mailrelay``: the command-line options and the service tree.

The tree is a MultiService: the store first (opened before anything can use it, closed last),
the auth thread pool, then one StreamServerEndpointService per SMTP listener, the pool of
worker processes (``workers > 1``) and the web resource. Listening sockets are bound in
privilegedStartService, so ``--uid``/``--gid`` can drop root after binding ports 25/465/587
(the workers start after that, as the unprivileged user).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceCollection, MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from mailrelay.auth.realm import makePortal
from mailrelay.auth.throttle import (
    FAILED_LOGINS_PER_ACCOUNT,
    FAILED_LOGINS_PER_CLIENT,
    LoginThrottle,
)
from mailrelay.config import Config, ConfigError, ListenerConfig, loadConfigSource
from mailrelay.delivery.build import makeDelivery
from mailrelay.delivery.reportsbuild import TrackingKeyService, makeDispatcher, makeTracker
from mailrelay.delivery.service import DeliveryProbe, DeliveryService
from mailrelay.files import handOver, keepFilesPrivate, warnIfShared
from mailrelay.interfaces import IStore, StoreError
from mailrelay.listening import defaultBacklog, withBacklog
from mailrelay.message.tracking import Tracker
from mailrelay.retention import RetentionService
from mailrelay.smtp.data import NATIVE_SCAN
from mailrelay.smtp.listener import ConnectionCounter, listenerFactory, listenerSettings
from mailrelay.store import makeStore
from mailrelay.submission import Submissions
from mailrelay.tls import certificatePaths, contextFromPEM, readPEM
from mailrelay.web import makeWebSite, serviceListeners
from mailrelay.web.health import oneProcess
from mailrelay.web.tracking import makeTrackingSite
from mailrelay.workers.balance import LoadTable
from mailrelay.workers.pool import WorkerPool, WorkerSetup

log = Logger()


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run the mailrelay SMTP submission relay. Without --config, ./mailrelay.toml is read "
        "if present, else the built-in defaults are used."
    )
    optParameters = [["config", "c", None, "TOML configuration file"]]

    def postOptions(self) -> None:
        try:
            self.loadedConfig, self.configSource = loadConfigSource(self["config"])
        except ConfigError as e:
            raise usage.UsageError(f"configuration: {e}") from None


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


class ListenerService(StreamServerEndpointService):
    """Listens on one endpoint; a port that cannot be bound stops the start with one line."""

    def __init__(self, description: str, *args: Any) -> None:
        super().__init__(*args)
        self.description = description
        self._raiseSynchronously = True
        self.port: Any = None  # the IListeningPort, once bound

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise SystemExit(f"mailrelay: cannot listen on {self.description}: {e}") from None
        # StreamServerEndpointService keeps the port only inside this Deferred; the worker
        # pool needs the listening socket itself to hand it to the other processes.
        assert self._waitingForPort is not None
        self._waitingForPort.addCallback(self._bound)

    def _bound(self, port: Any) -> Any:
        self.port = port
        return port


def _listen(
    parent: IServiceCollection, reactor: Any, endpoint: str, factory: Any
) -> ListenerService:
    """A ListenerService for ``endpoint`` under ``parent``. An endpoint that binds its own socket
    and names no ``backlog=`` listens with :func:`mailrelay.listening.defaultBacklog` rather
    than Twisted's 50 (docs/listeners.md); the service keeps ``endpoint`` as written."""
    try:
        serverEndpoint = endpoints.serverFromString(
            reactor, withBacklog(endpoint, defaultBacklog())
        )
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"mailrelay: not a usable endpoint {endpoint!r}: {e}") from None
    service = ListenerService(endpoint, serverEndpoint, factory)
    service.setServiceParent(parent)
    return service


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


def buildCore(
    config: Config,
    reactor: Any,
    root: MultiService,
    processIndex: int = 0,
    tlsPEM: tuple[bytes, bytes] | None = None,
    loads: LoadTable | None = None,
) -> RelayCore:
    """
    The store (started first, stopped last), the auth threads, the portal and the per-listener
    protocol factories of relay process ``processIndex`` (0: the main one), added to ``root``.

    With ``config.workers`` processes, the limits kept in memory are shared out: each process
    allows its part of the connections, of the failed logins per address and of each account's
    rate, so the relay as a whole never allows more than configured.

    ``tlsPEM`` (certificate chain, key) is what a worker was handed by the main process; the
    main process reads the configured files (or makes the self-signed pair) itself. ``loads``
    is the workers' shared table of open connections, where this process publishes its own.
    """
    spoolDir = config.dataPath / "spool"
    try:
        # data_dir before its spool: mkdir makes missing parents with the default mode (0755
        # under the usual umask), and data_dir holds password hashes and messages.
        for directory in (config.dataPath, spoolDir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        store = makeStore(config, reactor, processIndex)
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
            tlsContext = contextFromPEM(*tlsPEM)
        except (ValueError, OSError) as e:
            raise SystemExit(f"mailrelay: TLS: {e}") from None
    submissions = Submissions(store, config, reactor)
    portal, realm = makePortal(store, submissions, reactor, authPool)
    workers = config.workers
    throttle = LoginThrottle(
        reactor.seconds,
        maxFailures=_share(FAILED_LOGINS_PER_CLIENT, workers),
        maxAccountFailures=_share(FAILED_LOGINS_PER_ACCOUNT, workers),
    )
    connections = ConnectionCounter(
        _share(config.limits.max_connections, workers),
        _share(config.limits.max_connections_per_client, workers),
        publish=None if loads is None else partial(loads.set, processIndex),
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
        )
        return listenerFactory(settings)

    return RelayCore(
        store, portal, throttle, storeService, connections, factory, tlsPEM, submissions
    )


def _share(limit: int, workers: int) -> int:
    """One worker's part of a limit the whole relay keeps: rounded down, so that together they
    never allow more, but at least 1 (a limit below ``workers`` is then exceeded)."""
    return max(1, limit // workers)


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


def _handOverToRunAsUser(config: Config, twistdOptions: Any) -> None:
    """
    Started as root with ``twistd --uid/--gid``, the relay binds its ports as root and then
    runs as that user, which must own data_dir: hand it what was made here as root (data_dir,
    its spool, a self-signed key) or earlier (a database the command line made as root).
    """
    if twistdOptions is None or os.geteuid() != 0:
        return
    uid, gid = twistdOptions.get("uid"), twistdOptions.get("gid")
    if uid is None or uid == 0:
        return
    changed = handOver(config.dataPath, uid, os.getgid() if gid is None else gid)
    if changed:
        log.info(
            "gave {count} entries of data_dir to uid {uid} (twistd --uid)", count=changed, uid=uid
        )


def _deliveryServices(
    config: Config, core: RelayCore, reactor: Any, root: MultiService
) -> DeliveryService | None:
    """The outbound side, in the main process only (with the SQLite store one process
    delivers; relays sharing Redis split the work through its leases), and the expiry of old
    status trails. Added after the store, so they stop before it closes."""
    tracker = makeTracker(config)
    try:
        delivery = makeDelivery(
            config, core.store, reactor, core.storeService.whenReady, tracker=tracker
        )
    except ConfigError as e:
        raise SystemExit(f"mailrelay: {e}") from None
    if delivery is not None:
        if delivery.sms is not None and delivery.sms.service is not None:
            # Before the loop: started first, stopped after it (the SMPP link).
            delivery.sms.service.setServiceParent(root)
        delivery.setServiceParent(root)
        core.submissions.stored = delivery.wake
    RetentionService(core.store, config.limits.status_retention_days, reactor).setServiceParent(
        root
    )
    _reportServices(config, core, reactor, root, tracker)
    return delivery


def _reportServices(
    config: Config, core: RelayCore, reactor: Any, root: MultiService, tracker: Tracker | None
) -> None:
    """The report dispatcher (SPEC §8.4) and, with tracking on, the key loader and the
    public tracking listener (SPEC §8.5): main process only, like delivery."""
    whenReady = core.storeService.whenReady
    makeDispatcher(config, core.store, reactor, whenReady).setServiceParent(root)
    if tracker is not None:
        TrackingKeyService(tracker, core.store, whenReady).setServiceParent(root)
        site = makeTrackingSite(tracker, core.store, reactor)
        _listen(root, reactor, config.tracking.endpoint, site)


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """The whole relay, built from the options' configuration: the main process, which also
    starts the other ``workers - 1`` intake processes (:mod:`mailrelay.workers`)."""
    shortenGILTurns()
    if not NATIVE_SCAN:
        log.warn(
            "the C extension _mailrelay_scan is not built (no C compiler at install?): "
            "message text is scanned in pure Python, several times slower for large messages"
        )
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    config: Config | None = getattr(options, "loadedConfig", None)
    source: str | None = getattr(options, "configSource", None)
    if config is None:
        config, source = loadConfigSource(options["config"])
    keepFilesPrivate()
    root = MultiService()
    loads = LoadTable.create(config.workers) if config.workers > 1 else None
    core = buildCore(config, reactor, root, loads=loads)
    warnIfShared(config.dataPath)
    _handOverToRunAsUser(config, getattr(options, "parent", None))
    listeners = [
        _listen(root, reactor, listener.endpoint, core.listenerFactory(listener))
        for listener in config.listeners
    ]
    delivery = _deliveryServices(config, core, reactor, root)
    pool = None
    if loads is not None:
        loads.set(0, 0)  # the main process serves from the start
        # The workers get the configuration and the TLS files as read now: a later edit of
        # the files (or files only root may read, after --uid) changes nothing for them.
        pool = WorkerPool(
            reactor,
            count=config.workers - 1,
            setup=WorkerSetup(source, core.tlsPEM),
            listeners=listeners,
            loads=loads,
            openConnections=lambda: core.connections.total,
            whenReady=core.storeService.whenReady,
        )
        pool.setServiceParent(root)
    _listen(
        root,
        reactor,
        config.web.endpoint,
        makeWebSite(
            core.store,
            core.portal,
            core.throttle,
            config,
            reactor,
            listenersUp=serviceListeners(root, [lc.endpoint for lc in config.listeners]),
            workers=oneProcess if pool is None else pool.serving,
            delivery=DeliveryProbe(
                config.delivery.mode,
                core.store,
                reactor,
                delivery,
                None if delivery is None else delivery.connections,
            ),
            smsReceipts=None if delivery is None or delivery.sms is None else delivery.sms.receipts,
        ),
    )
    return root
