"""
When to try again (SPEC §8.2): the delay doubles from ``retry_min`` up to ``retry_max``, with
±10 % jitter so that messages deferred together do not all come back at the same moment, until
``max_queue_lifetime`` after acceptance; then the relay gives up.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from dataclasses import dataclass

from mailrelay.config import DeliveryConfig

JITTER = 0.1


@dataclass(frozen=True)
class RetrySchedule:
    """Seconds: the first retry delay, the longest delay, how long a message may stay queued."""

    minimum: float
    maximum: float
    lifetime: float
    random: Callable[[], float] = _random.random

    @classmethod
    def fromConfig(cls, config: DeliveryConfig) -> RetrySchedule:
        return cls(
            minimum=config.seconds("retry_min"),
            maximum=config.seconds("retry_max"),
            lifetime=config.seconds("max_queue_lifetime"),
        )

    def delay(self, attempts: int) -> float:
        """The wait after the ``attempts``-th attempt failed for now (attempts counts from 1)."""
        base = min(self.maximum, self.minimum * 2 ** min(max(attempts - 1, 0), 32))
        return base * (1 + JITTER * (2 * self.random() - 1))

    def expired(self, receivedAt: float, now: float) -> bool:
        """Whether a message accepted at ``receivedAt`` has outlived the queue lifetime."""
        return now >= receivedAt + self.lifetime

    def nextAttempt(self, attempts: int, receivedAt: float, now: float) -> float:
        """When to try again after a temporary failure; never later than the end of the
        queue lifetime, so that the last attempt comes just as it ends."""
        return min(now + self.delay(attempts), receivedAt + self.lifetime)
