"""
The delivery side of one relay process, built alike by the main process and by every worker:
the delivery loop of ``[delivery]`` (with its SMS gateway), the tracking key it signs links
with, and the switch a reload makes to a loop built from the new configuration.

Every process delivers, so delivery has every core the intake has: with the SQLite store each
process claims from the file it accepts into (the main process also from the files of workers
no longer running), with Redis every process claims from the one queue under its leases.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.application.service import IServiceCollection
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from mailrelay.config import Config, ConfigError
from mailrelay.delivery.build import makeDelivery
from mailrelay.delivery.reportsbuild import TrackingKeyService, makeTracker
from mailrelay.delivery.service import DeliveryService, publishConnections
from mailrelay.interfaces import IStore

log = Logger()


def _nothingStored() -> None:
    pass


class Intake(Protocol):
    stored: Callable[[], None]
    """Called after each message the intake stores."""
    admit: Callable[[], Deferred[None] | None]
    """Called at each MAIL: None, or a Deferred the MAIL waits for."""


def _admitted() -> None:
    return None


class DeliverySide:
    """
    The delivery loop of this process (None in hold mode without an SMS gateway) under
    ``root``, woken whenever ``intake`` stores a message. Raises
    ConfigError for a ``[delivery]`` or ``[sms]`` it cannot serve.
    """

    def __init__(
        self,
        config: Config,
        store: IStore,
        reactor: Any,
        whenReady: Callable[[], Deferred[None]],
        root: IServiceCollection,
        intake: Intake,
    ) -> None:
        self._store = store
        self._reactor = reactor
        self._whenReady = whenReady
        self._root = root
        self._intake = intake
        self.tracker = makeTracker(config)
        if self.tracker is not None:
            TrackingKeyService(self.tracker, store, whenReady).setServiceParent(root)
        self.delivery = self._build(config)
        self._install(self.delivery)

    def _build(self, config: Config) -> DeliveryService | None:
        return makeDelivery(config, self._store, self._reactor, self._whenReady, self.tracker)

    def _install(self, delivery: DeliveryService | None) -> None:
        if delivery is not None:
            if delivery.sms is not None and delivery.sms.service is not None:
                # Before the loop: started first, stopped after it (the SMPP link).
                delivery.sms.service.setServiceParent(self._root)
            delivery.setServiceParent(self._root)
        self._intake.stored = _nothingStored if delivery is None else delivery.wake
        inFlow = None if delivery is None else delivery.inFlow
        self._intake.admit = _admitted if inFlow is None else inFlow.take

    async def switch(self, config: Config) -> None:
        """A reload's change of ``[delivery]``, ``[sms]`` or the host name: the running loop
        stops as at a drain (attempts finish or give their leases back), then a loop built
        from ``config`` starts. A configuration it cannot serve keeps the running loop."""
        try:
            new = self._build(config)
        except ConfigError as e:
            log.error("reload: the delivery side is kept as it was: {error}", error=str(e))
            return
        old, self.delivery = self.delivery, new
        if old is not None:
            await maybeDeferred(old.disownServiceParent)
            if old.sms is not None and old.sms.service is not None:
                await maybeDeferred(old.sms.service.disownServiceParent)
        self._install(new)

    def connections(self) -> dict[str, int]:
        """Outbound connections open now, by destination."""
        return {} if self.delivery is None else self.delivery.connections()

    def publishGauges(self) -> None:
        """Set this process's delivery gauges (before its metrics are sent or served)."""
        publishConnections(self.connections())
