"""
The reports side of the service tree, built from ``[delivery_reports]`` and ``[tracking]``:
the dispatcher of the outbox, and, with a tracking ``base_url``, the tracker the delivery
engine rewrites HTML with and the public listener's resource that serves ``/t/``.
"""

from __future__ import annotations

import secrets
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailrelay.config import Config
from mailrelay.delivery.reports import ReportDispatcher
from mailrelay.delivery.smtp.mx import makeResolver
from mailrelay.delivery.smtp.safeagent import safeAgent
from mailrelay.interfaces import IStore
from mailrelay.message.tracking import KEY_NAME, Tracker
from mailrelay.netaddress import AddressPolicy

log = Logger()


def makeDispatcher(
    config: Config, store: IStore, reactor: Any, whenReady: Any = None
) -> ReportDispatcher:
    """The dispatcher: treq through the SSRF-safe agent, which connects only to public
    addresses and those in ``[delivery_reports] allow_networks``."""
    addresses = AddressPolicy(config.delivery_reports.allow_networks)

    def makeAgent() -> tuple[Any, Any]:
        resolver = makeResolver(config.delivery.nameservers, reactor)
        return safeAgent(reactor, resolver, addresses), lambda: _stopResolver(resolver)

    return ReportDispatcher(store, None, reactor, whenReady=whenReady, makeAgent=makeAgent)


def _stopResolver(resolver: Any) -> None:
    """Stop the re-reading of /etc/resolv.conf a system resolver schedules for ever."""
    for one in getattr(resolver, "resolvers", [resolver]):
        call = getattr(one, "_parseCall", None)
        if call is not None and call.active():
            call.cancel()


def makeTracker(config: Config) -> Tracker | None:
    """A tracker for ``[tracking] base_url``; None when it is empty (tracking off)."""
    if not config.tracking.base_url:
        return None
    return Tracker(config.tracking.base_url)


class TrackingKeyService(Service):
    """Loads the tracking tokens' MAC key once the store is open: made once, kept in the
    store, so every relay sharing it reads the others' tokens."""

    def __init__(self, tracker: Tracker, store: IStore, whenReady: Any) -> None:
        self._tracker = tracker
        self._store = store
        self._whenReady = whenReady

    def startService(self) -> None:
        super().startService()
        d: Deferred[Any] = self._whenReady()
        d.addCallback(lambda _: self._store.sharedKey(KEY_NAME, secrets.token_bytes(32)))
        d.addCallback(self._loaded)
        d.addErrback(lambda f: log.failure("tracking: cannot load the key", f))

    def _loaded(self, key: bytes) -> None:
        self._tracker.key = key
