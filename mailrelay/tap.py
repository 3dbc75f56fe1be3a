"""
``twistd mailrelay``: the command-line options and the service tree.

The tree is a MultiService: the store first (opened before anything can use it, closed last),
the auth thread pool, then one StreamServerEndpointService per SMTP listener and one for the
web resource. Listening sockets are bound in privilegedStartService, so ``--uid``/``--gid``
can drop root after binding ports 25/465/587.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceCollection, MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from mailrelay.auth.realm import makePortal
from mailrelay.auth.throttle import LoginThrottle
from mailrelay.config import Config, ConfigError, loadConfig
from mailrelay.interfaces import IStore, StoreError
from mailrelay.smtp.listener import ConnectionCounter, listenerFactory, listenerSettings
from mailrelay.store import makeStore
from mailrelay.submission import Submissions
from mailrelay.tls import certificatePaths, contextFactory
from mailrelay.web import makeWebSite, serviceListeners

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
            self.loadedConfig: Config = loadConfig(self["config"])
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

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise SystemExit(f"mailrelay: cannot listen on {self.description}: {e}") from None


def _listen(parent: IServiceCollection, reactor: Any, endpoint: str, factory: Any) -> None:
    try:
        serverEndpoint = endpoints.serverFromString(reactor, endpoint)
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"mailrelay: not a usable endpoint {endpoint!r}: {e}") from None
    ListenerService(endpoint, serverEndpoint, factory).setServiceParent(parent)


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """The whole relay, built from the options' configuration."""
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    config: Config = getattr(options, "loadedConfig", None) or loadConfig(options["config"])
    spoolDir = config.dataPath / "spool"
    try:
        spoolDir.mkdir(mode=0o700, parents=True, exist_ok=True)
        store = makeStore(config, reactor)
    except OSError as e:
        raise SystemExit(f"mailrelay: data_dir {config.data_dir!r}: {e.strerror or e}") from None
    except (StoreError, ConfigError) as e:
        raise SystemExit(f"mailrelay: {e}") from None

    root = MultiService()
    storeService = StoreService(store, reactor)
    storeService.setServiceParent(root)
    authPool = ThreadPool(minthreads=1, maxthreads=2, name="mailrelay-auth")
    ThreadPoolService(authPool).setServiceParent(root)

    tlsContext = None
    if any(listener.security != "none" for listener in config.listeners):
        try:
            tlsContext = contextFactory(*certificatePaths(config))
        except (ValueError, OSError) as e:
            raise SystemExit(f"mailrelay: TLS: {e}") from None
    submissions = Submissions(store, config, reactor)
    portal, realm = makePortal(store, submissions, reactor, authPool)
    throttle = LoginThrottle(reactor.seconds)
    connections = ConnectionCounter(
        config.limits.max_connections, config.limits.max_connections_per_client
    )
    for listener in config.listeners:
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
        _listen(root, reactor, listener.endpoint, listenerFactory(settings))
    _listen(
        root,
        reactor,
        config.web.endpoint,
        makeWebSite(
            store,
            portal,
            throttle,
            config,
            reactor,
            listenersUp=serviceListeners(root, [lc.endpoint for lc in config.listeners]),
        ),
    )
    return root
