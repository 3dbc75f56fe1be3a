"""
What the intake edge says about store failures: one log line when the store starts failing
and one when it answers again, not a traceback per message.

Under an outage every message (and every check that reads the store) fails the same way, and
a critical traceback for each flooded the log at thousands a second. Each failure is counted
in ``mailrelay_store_failures`` on /metrics instead; the clients got ``451 4.3.0`` and retry.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay import metrics


class StoreHealth:
    """Whether the store failed last (this process's view), logged at each change."""

    def __init__(self, log: Logger | None = None) -> None:
        self.log = log or Logger(namespace=__name__)
        self.down = False

    def failed(self, failure: Failure) -> None:
        """A store operation failed: counted; logged if the store was not already down."""
        metrics.storeFailures.inc()
        if not self.down:
            self.down = True
            self.log.error(
                "store unavailable ({reason}): answering 451 until it is back; further "
                "failures are counted in mailrelay_store_failures",
                reason=failure.getErrorMessage(),
            )

    def succeeded(self) -> None:
        """A store operation succeeded: logged if the store was down."""
        if self.down:
            self.down = False
            self.log.info("store available again")


storeHealth = StoreHealth()
"""This process's one record (every listener's sessions share the store)."""
