"""
A relay process's life after its start: the drain at stop (SIGTERM), the reload (SIGHUP),
and what systemd is told of both.

- :class:`RelayRoot` is the top of every relay process's service tree. Its stop drains:
  first the SMTP listeners stop accepting and the sessions finish (within
  ``[limits] drain_timeout``; :mod:`mailrelay.smtp.sessions`) while the worker processes
  drain the same way and the delivery loop finishes or gives back its attempts; then the
  web listener and the auth threads stop; the store closes last, once nothing writes to it.
- :class:`LiveSettings` is what a reload changes in a running process: the TLS certificate
  (:class:`~mailrelay.tls.ReloadableTLS`), the limits and the host name new sessions get,
  the connection limits, the avatars' configuration. Sessions open keep their settings.
- :class:`SignalService` (main process under ``twistd`` only) turns SIGTERM into the drain
  (and an exit status of 0) and SIGHUP into :meth:`RelayRoot.reload`.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, Logger

from mailrelay.config import Config
from mailrelay.sdnotify import Notifier
from mailrelay.smtp.sessions import SessionRegistry
from mailrelay.tls import ReloadableTLS

log = Logger()


RESTART_ONLY = ("data_dir", "workers", "listeners", "web", "store", "tracking")
"""Top-level keys a reload does not change (the sockets and the store are open): an edit of
one is logged and takes effect at the next restart."""


def restartOnlyChanges(old: Config, new: Config) -> list[str]:
    """The :data:`RESTART_ONLY` keys whose values differ between ``old`` and ``new``."""
    return [name for name in RESTART_ONLY if getattr(old, name) != getattr(new, name)]


@dataclasses.dataclass
class LiveSettings:
    """What a reload changes in one relay process (see the module's docstring)."""

    config: Config
    tls: ReloadableTLS | None
    connections: Any  # mailrelay.smtp.settings.ConnectionCounter
    submissions: Any  # mailrelay.submission.Submissions
    factories: list[Any] = dataclasses.field(default_factory=list)  # SubmissionFactory

    def apply(self, config: Config, tlsContext: Any) -> None:
        """Make ``config`` (and ``tlsContext``, when not None) what new sessions get."""
        if self.tls is not None and tlsContext is not None:
            self.tls.current = tlsContext
        # The restart-only keys keep their running values (the process count among them,
        # which shares out the limits); the avatars get everything else.
        running = {name: getattr(self.config, name) for name in RESTART_ONLY}
        config = dataclasses.replace(config, **running)
        self.connections.maxTotal = config.perProcess(config.limits.max_connections)
        self.connections.maxPerClient = config.perProcess(config.limits.max_connections_per_client)
        self.submissions.config = config
        for factory in self.factories:
            factory.settings = dataclasses.replace(
                factory.settings, hostname=config.hostname, limits=config.limits
            )
        self.config = self.submissions.config


class RelayRoot(MultiService):
    """
    The top of a relay process's service tree; its stop is the drain described in the
    module's docstring. ``intake`` are the services that stop first (the SMTP listeners,
    the worker pool, the delivery loop...), ``last`` the one stopped after all others (the
    store's service).
    """

    def __init__(
        self, clock: IReactorTime, drainTimeout: float, notifier: Notifier | None = None
    ) -> None:
        super().__init__()
        self.clock = clock
        self.drainTimeout = drainTimeout
        self.sessions = SessionRegistry(clock)
        self.notifier = notifier or Notifier({})
        self.last: list[IService] = []
        self.afterDrain: list[IService] = []
        self.reloader: Callable[[], Deferred[bool]] | None = None
        self.stopped: Deferred[None] = Deferred()  # fires once the stop is complete
        # () -> Deferred firing once the listeners and the store are up: READY=1 then.
        self.whenReady: Callable[[], Deferred[Any]] | None = None
        # Set for twistd's application as its ILogObserver (--log-format json).
        self.logObserver: Any = None
        self._watchdog: Any = None

    def setServiceParent(self, parent: Any) -> None:
        # twistd makes the application (a Componentized) the parent of this service, and
        # asks it for an ILogObserver after makeService: the way to choose the log's format.
        if self.logObserver is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.logObserver)
        super().setServiceParent(parent)

    def startService(self) -> None:
        super().startService()
        if self.whenReady is not None:
            self.whenReady().addCallback(self._ready)

    def _ready(self, _: object) -> None:
        if self.running:
            self.notifier.ready()
            self._watchdog = self.notifier.startWatchdog(self.clock)

    def reload(self) -> Deferred[bool]:
        """Re-read the configuration and the TLS files (SIGHUP); fires with whether the new
        ones are in use."""
        if self.reloader is None or not self.running:
            return Deferred.fromCoroutine(_false())
        return self.reloader()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)  # not MultiService's: the order is ours
        d = Deferred.fromCoroutine(self._stop())
        d.addBoth(self._stoppedAll)
        return d

    def _stoppedAll(self, result: Any) -> Any:
        if not self.stopped.called:
            self.stopped.callback(None)
        return result

    async def _stop(self) -> None:
        self.notifier.stopping()
        later = set(map(id, self.last)) | set(map(id, self.afterDrain))
        services = [s for s in reversed(list(self)) if id(s) not in later]
        first = [maybeDeferred(s.stopService) for s in services if s.running]
        drained = self.sessions.drain(self.drainTimeout)
        closed = await drained
        if closed:
            log.warn("{count} SMTP sessions closed at the drain deadline", count=closed)
        await DeferredList(first, consumeErrors=True)
        await DeferredList(
            [maybeDeferred(s.stopService) for s in reversed(self.afterDrain) if s.running],
            consumeErrors=True,
        )
        for service in reversed(self.last):
            if service.running:
                await maybeDeferred(service.stopService)
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()


async def _false() -> bool:
    return False


class SignalService(Service):
    """
    SIGTERM: stop the reactor, hence drain (:class:`RelayRoot`), once; the process then
    exits with 0 (twistd's own handler would make it end by the signal). SIGHUP: reload.
    Installed once the reactor runs (it installs its own handlers at its start); a SIGHUP
    before then is kept for then (:meth:`keepEarlyReloads`).
    """

    def __init__(
        self,
        reactor: Any,
        reload: Callable[[], Any],
        signals: Any = signal,
    ) -> None:
        self.reactor = reactor
        self._reload = reload
        self._signals = signals
        self.stopping = False
        self._reloadAsked = False

    def keepEarlyReloads(self) -> None:
        """From now until :meth:`install`, a SIGHUP is remembered and the reload runs once the
        reactor does. The listeners accept before then, and SIGHUP's default action would end
        the process: a reload asked for as the relay starts must not stop it."""
        self._signals.signal(self._signals.SIGHUP, self._hangUpEarly)

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self.install)

    def install(self) -> None:
        self._signals.signal(self._signals.SIGTERM, self._terminate)
        self._signals.signal(self._signals.SIGHUP, self._hangUp)
        if self._reloadAsked:
            self._reloadAsked = False
            self._reload()

    def _hangUpEarly(self, number: int, frame: Any) -> None:
        self._reloadAsked = True

    def _terminate(self, number: int, frame: Any) -> None:
        self.reactor.callFromThread(self.stop)

    def _hangUp(self, number: int, frame: Any) -> None:
        self.reactor.callFromThread(self._reload)

    def stop(self) -> None:
        """Stop the reactor unless a stop is under way (a second SIGTERM changes nothing)."""
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping: the sessions drain first")
        try:
            self.reactor.stop()
        except ReactorNotRunning:  # stopping already for another reason
            pass


class Reloader:
    """
    The main process's reload: read the configuration file and the TLS files again; if both
    are usable, apply them (:class:`LiveSettings`), hand them to the workers (``workers``)
    and to the delivery side (``delivery``); if either is not, log one line and keep the
    running ones. systemd hears ``RELOADING=1``, then ``READY=1``.
    """

    def __init__(
        self,
        load: Callable[[], tuple[Config, str | None]],
        readTLS: Callable[[Config], tuple[tuple[bytes, bytes], Any] | None],
        live: LiveSettings,
        notifier: Notifier,
        workers: Callable[[str | None, tuple[bytes, bytes] | None], None] | None = None,
        delivery: Callable[[Config], Awaitable[None]] | None = None,
    ) -> None:
        self._load = load
        self._readTLS = readTLS
        self.live = live
        self._notifier = notifier
        self.workers = workers
        self.delivery = delivery
        self._busy = False

    def __call__(self) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._reload())

    async def _reload(self) -> bool:
        if self._busy:
            log.warn("reload: one is under way; this one is ignored")
            return False
        self._busy = True
        self._notifier.reloading()
        try:
            return await self._reloadNow()
        finally:
            self._busy = False
            self._notifier.ready()

    async def _reloadNow(self) -> bool:
        try:
            config, source = self._load()
            tls = self._readTLS(config)
        except (ValueError, OSError) as e:  # ConfigError is a ValueError
            log.error("reload refused, the running configuration is kept: {error}", error=str(e))
            return False
        changed = restartOnlyChanges(self.live.config, config)
        if changed:
            log.warn(
                "reload: {keys} changed; that takes effect at the next restart",
                keys=", ".join(changed),
            )
        old = self.live.config
        pem, context = (None, None) if tls is None else tls
        self.live.apply(config, context)
        if self.workers is not None:
            self.workers(source, pem)
        if self.delivery is not None and deliveryChanged(old, config):
            await self.delivery(self.live.config)
        log.info("reloaded: new sessions get the new configuration and certificate")
        return True


def deliveryChanged(old: Config, new: Config) -> bool:
    """Whether a reload from ``old`` to ``new`` changes the delivery side."""
    return (old.delivery, old.sms, old.delivery_reports, old.hostname) != (
        new.delivery,
        new.sms,
        new.delivery_reports,
        new.hostname,
    )
