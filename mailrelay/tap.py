"""
``twistd mailrelay``: the command-line options and the service tree.

The tree is a MultiService: the store first (opened before anything can use it, closed last),
the auth thread pool, then one StreamServerEndpointService per SMTP listener, the web resource
(and, when the web endpoint has a process of its own, a private loopback listener that process
forwards to) and the pool of the worker processes (``workers > 1``) and the web process.
Listening sockets are bound in privilegedStartService, so ``--uid``/``--gid`` can drop root
after binding ports 25/465/587 (the workers start after that, as the unprivileged user).
"""

from __future__ import annotations

import os
import sys
from functools import partial
from typing import IO, Any, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceCollection, MultiService
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.logfile import LogFile

from mailrelay.config import (
    Config,
    ConfigError,
    loadConfigSource,
    proxied,
    webInOwnProcess,
    withProcessCount,
)
from mailrelay.core import (
    RelayCore,
    ThreadPoolService,
    buildCore,
    collectGarbageLessOften,
    freezeStartHeap,
    shortenGILTurns,
)
from mailrelay.delivery.reportsbuild import makeDispatcher
from mailrelay.delivery.service import DeliveryProbe
from mailrelay.delivery.side import DeliverySide
from mailrelay.files import handOver, keepFilesPrivate, warnIfShared
from mailrelay.lifecycle import LiveSettings, RelayRoot, Reloader, SignalService
from mailrelay.listening import defaultBacklog, withBacklog
from mailrelay.maillog import LOG_FORMATS, jsonLinesObserver, textLinesObserver
from mailrelay.retention import RetentionService
from mailrelay.sdnotify import Notifier
from mailrelay.smtp.data import NATIVE_SCAN
from mailrelay.smtp.proxy import ProxyHeaderFactory
from mailrelay.tls import certificatePaths, contextFromPEM, readPEM
from mailrelay.web import makeWebSite, serviceListeners
from mailrelay.web.health import oneProcess
from mailrelay.web.tracking import makeTrackingSite
from mailrelay.workers.balance import LoadTable
from mailrelay.workers.pool import STOP_TIMEOUT, WebProcessSetup, WorkerPool, WorkerSetup

log = Logger()


class ConfigurationError(SystemExit):
    """
    The configuration file cannot be used. twistd prints its whole usage block above a
    UsageError's message, which buries the one line that matters; a SystemExit goes through
    twistd unchanged, so the message alone reaches stderr and the exit status is 1.
    """


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run the mailrelay SMTP submission relay. Without --config, ./mailrelay.toml is read "
        "if present, else the built-in defaults are used."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file"],
        ["log-format", None, "text", "the log: text (twistd's lines) or json (an object a line)"],
    ]

    def postOptions(self) -> None:
        if self["log-format"] not in LOG_FORMATS:
            raise usage.UsageError(f"--log-format: one of {', '.join(LOG_FORMATS)}")
        try:
            self.loadedConfig, self.configSource = loadConfigSource(self["config"])
        except ConfigError as e:
            raise ConfigurationError(f"mailrelay: configuration: {e}") from None


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


def _listenSMTP(
    parent: IServiceCollection, reactor: Any, endpoint: str, factory: Any
) -> ListenerService:
    """:func:`_listen` for an SMTP listener: behind ``haproxy:`` the session starts once the
    PROXY header is read (:mod:`mailrelay.smtp.proxy`), so it sees the client's address."""
    behindProxy, inner = proxied(endpoint)
    if not behindProxy:
        return _listen(parent, reactor, endpoint, factory)
    service = _listen(parent, reactor, inner, ProxyHeaderFactory(factory, reactor))
    service.description = endpoint
    return service


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
) -> DeliverySide:
    """The outbound side (every process has one: :mod:`mailrelay.delivery.side`), and, in the
    main process only, the expiry of old status trails, the report dispatcher (SPEC §8.4) and,
    with tracking on, the public tracking listener (SPEC §8.5). Added after the store, so they
    stop before it closes."""
    whenReady = core.storeService.whenReady
    try:
        side = DeliverySide(config, core.store, reactor, whenReady, root, core.submissions)
    except ConfigError as e:
        raise SystemExit(f"mailrelay: {e}") from None
    RetentionService(core.store, config.limits.status_retention_days, reactor).setServiceParent(
        root
    )
    makeDispatcher(config, core.store, reactor, whenReady).setServiceParent(root)
    if side.tracker is not None:
        site = makeTrackingSite(side.tracker, core.store, reactor)
        _listen(root, reactor, config.tracking.endpoint, site)
    return side


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """The whole relay, built from the options' configuration: the main process, which also
    starts the other ``workers - 1`` intake processes (:mod:`mailrelay.workers`)."""
    shortenGILTurns()
    collectGarbageLessOften()
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
    config = withProcessCount(config)
    log.info("relay processes: {count}, each accepting and delivering", count=config.workers)
    if webInOwnProcess(config):
        log.info("the web endpoint: a process of its own")
    keepFilesPrivate()
    notifier = Notifier()
    root = RelayRoot(reactor, config.limits.drain_timeout, notifier)
    twistdOptions = getattr(options, "parent", None)
    if twistdOptions is not None:
        root.logObserver = _logObserver(options["log-format"], twistdOptions)
    loads = LoadTable.create(config.workers) if config.workers > 1 else None
    core = buildCore(
        config,
        reactor,
        root,
        publishConnections=None if loads is None else partial(loads.set, 0),
        sessions=root.sessions,
    )
    # The drain's order (mailrelay.lifecycle): the store closes last, the auth threads
    # (and the web listener, below) stop once the sessions are done.
    root.last.append(core.storeService)
    root.afterDrain += [s for s in root if isinstance(s, ThreadPoolService)]
    root.whenReady = core.storeService.whenReady
    warnIfShared(config.dataPath)
    _handOverToRunAsUser(config, getattr(options, "parent", None))
    listeners = [
        _listenSMTP(root, reactor, listener.endpoint, core.listenerFactory(listener))
        for listener in config.listeners
    ]
    side = _deliveryServices(config, core, reactor, root)
    pool: WorkerPool | None = None
    separateWeb = webInOwnProcess(config)
    probe = DeliveryProbe(config.delivery.mode, core.store, reactor, lambda: side.delivery)
    delivery = side.delivery
    site = makeWebSite(
        core.store,
        core.portal,
        core.throttle,
        config,
        reactor,
        listenersUp=serviceListeners(root, [lc.endpoint for lc in config.listeners]),
        workers=oneProcess if loads is None else lambda: cast(WorkerPool, pool).serving(),
        delivery=probe,
        smsReceipts=None if delivery is None or delivery.sms is None else delivery.sms.receipts,
        webProcess=(lambda: cast(WorkerPool, pool).webServing()) if separateWeb else None,
    )
    web = _listen(root, reactor, config.web.endpoint, site)
    root.afterDrain.append(web)
    webProcess = None
    if separateWeb:
        # The web process answers the endpoint; what only this process knows, it asks for
        # here, on the loopback interface (mailrelay.workers.web).
        forward = _listen(root, reactor, "tcp:0:interface=127.0.0.1", site)
        root.afterDrain.append(forward)
        webProcess = WebProcessSetup(web, forward)
    if loads is not None or webProcess is not None:
        if loads is not None:
            loads.set(0, 0)  # the main process serves from the start
        # The workers get the configuration and the TLS files as read now: a later edit of
        # the files (or files only root may read, after --uid) changes nothing for them.
        pool = WorkerPool(
            reactor,
            count=config.workers - 1,
            setup=WorkerSetup(source, core.tlsPEM, options["log-format"], config.workers),
            listeners=listeners,
            loads=loads,
            openConnections=lambda: core.connections.total,
            whenReady=core.storeService.whenReady,
            stopTimeout=config.limits.drain_timeout + STOP_TIMEOUT,
            web=webProcess,
        )
        pool.setServiceParent(root)
    root.reloader = Reloader(
        load=lambda: _loadDecided(options["config"]),
        readTLS=lambda new: _readTLS(config, new),
        live=LiveSettings(config, core.tls, core.connections, core.submissions, core.factories),
        notifier=notifier,
        workers=None if pool is None else pool.reload,
        delivery=side.switch,
    )
    if twistdOptions is not None:
        # Under twistd only: a relay built inside another program (the tests) leaves that
        # program's signals and heap alone.
        signals = SignalService(reactor, root.reload)
        signals.keepEarlyReloads()  # before any listener starts
        signals.setServiceParent(root)
        core.storeService.whenReady().addCallback(lambda _: freezeStartHeap())
    return root


def _loadDecided(path: str | None) -> tuple[Config, str | None]:
    """The configuration file read again for a reload, ``workers = "auto"`` decided as at the
    start (so that only a real change of it is reported as one)."""
    config, source = loadConfigSource(path)
    return withProcessCount(config), source


def _readTLS(running: Config, new: Config) -> tuple[tuple[bytes, bytes], Any] | None:
    """The certificate and key of ``new`` (its files read again) and their TLS context, for a
    reload; None when the running listeners use no TLS. Raises ValueError or OSError."""
    if all(listener.security == "none" for listener in running.listeners):
        return None
    pem = readPEM(*certificatePaths(new))
    return pem, contextFromPEM(*pem)


def _logObserver(logFormat: str, twistdOptions: Any) -> Any:
    """The observer of twistd's log (the mail log's lines are most of it): JSON lines, or
    twistd's text lines made cheaper (:mod:`mailrelay.maillog`). None -- twistd's own --
    with ``--logger`` or ``--syslog``, which then decide."""
    if twistdOptions.get("logger") or twistdOptions.get("syslog"):
        if logFormat == "json":
            log.warn("--log-format json is ignored with twistd's --logger or --syslog")
        return None
    makeObserver = jsonLinesObserver if logFormat == "json" else textLinesObserver
    return makeObserver(_logFile(twistdOptions))


def _logFile(twistdOptions: Any) -> IO[str]:
    """Where twistd would write its log: standard output under ``--nodaemon`` without
    ``--logfile`` (or with ``--logfile=-``), else the file (``twistd.log`` by default)."""
    name = "" if twistdOptions is None else (twistdOptions.get("logfile") or "")
    nodaemon = twistdOptions is None or twistdOptions.get("nodaemon")
    if name == "-" or (not name and nodaemon):
        return sys.stdout
    return cast(IO[str], LogFile.fromFullPath(name or "twistd.log"))
