"""
Notification ids: decimal strings that sort by time and never collide across relay instances.

Layout (a 63-bit integer, printed in decimal):
``milliseconds since 2020-01-01 (41 bits) | instance (10 bits) | sequence (12 bits)``.
The generator never goes backwards: if the clock steps back it keeps counting from the last
millisecond it used, and 4096 ids in one millisecond borrow the next millisecond.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

EPOCH_MS = 1577836800000  # 2020-01-01T00:00:00Z
INSTANCE_BITS = 10
SEQUENCE_BITS = 12
MAX_INSTANCE = (1 << INSTANCE_BITS) - 1
_SEQUENCE_MASK = (1 << SEQUENCE_BITS) - 1


class NotificationIdGenerator:
    """Makes ids for one relay instance; ``seconds`` is a clock such as ``reactor.seconds``."""

    def __init__(self, instance: int, seconds: Callable[[], float]) -> None:
        if not 0 <= instance <= MAX_INSTANCE:
            raise ValueError(f"instance id must be 0..{MAX_INSTANCE}, not {instance}")
        self._instance = instance
        self._seconds = seconds
        self._lastMs = 0
        self._sequence = 0
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            nowMs = int(self._seconds() * 1000) - EPOCH_MS
            if nowMs > self._lastMs:
                self._lastMs = nowMs
                self._sequence = 0
            else:
                self._sequence = (self._sequence + 1) & _SEQUENCE_MASK
                if self._sequence == 0:
                    self._lastMs += 1
            value = (
                (self._lastMs << (INSTANCE_BITS + SEQUENCE_BITS))
                | (self._instance << SEQUENCE_BITS)
                | self._sequence
            )
        return str(value)


def timestampOf(notificationId: str) -> float:
    """The POSIX time (seconds) at which an id was made."""
    return ((int(notificationId) >> (INSTANCE_BITS + SEQUENCE_BITS)) + EPOCH_MS) / 1000.0
