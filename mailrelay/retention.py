"""
``limits.status_retention_days``: notifications older than that, and no longer queued, are
forgotten with their status trails -- by a timer of the main process, a batch at a time.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mailrelay.interfaces import IStore
from mailrelay.model import fromTimestamp

log = Logger()

EXPIRY_INTERVAL = 3600.0
"""Seconds between two passes (the status API hides expired trails in between anyway)."""


class RetentionService(Service):
    """Calls ``store.expire`` every ``interval`` seconds (the first time one interval after
    the start, when the store is long open) for what is older than ``days``."""

    def __init__(
        self, store: IStore, days: int, clock: Any, interval: float = EXPIRY_INTERVAL
    ) -> None:
        self.clock = clock
        self._store = store
        self._days = days
        self._interval = interval
        self._loop = LoopingCall(self.expireOnce)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=False)

    def stopService(self) -> Any:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def expireOnce(self) -> Any:
        before = fromTimestamp(self.clock.seconds()) - timedelta(days=self._days)

        def done(count: int) -> None:
            if count:
                log.info("retention: forgot {count} notifications", count=count)

        def failed(failure: Any) -> None:
            log.warn("retention: expiry failed: {error}", error=str(failure.value))

        return self._store.expire(before).addCallbacks(done, failed)
