"""
What every store backend shares: timestamps as stored, notification ids as numbers, the queue
entry delivery workers claim, and how long account data may be remembered.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from mailrelay.model import Notification

ACCOUNT_CACHE_SECONDS = 1.0
"""How long a backend may remember account, API-key and sender lookups (its own writes clear
them at once; another process's are seen within this time)."""
ACCOUNT_CACHE_ENTRIES = 10_000
"""At most this many remembered lookups; past it, they are all forgotten."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


def toMillis(moment: datetime) -> int:
    """Integer UTC milliseconds since the epoch (a naive datetime is taken to be UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _MILLISECOND


def fromMillis(millis: int) -> datetime:
    """The timezone-aware UTC datetime of a stored timestamp."""
    return _EPOCH + timedelta(milliseconds=millis)


def idNumber(notificationId: str) -> int | None:
    """The integer a notification id is stored as, or None if it cannot be one of ours."""
    if notificationId.isascii() and notificationId.isdigit():
        number = int(notificationId)
        if number < 2**63 and str(number) == notificationId:
            return number
    return None


@dataclass(frozen=True)
class QueueEntry:
    """A notification claimed by a delivery worker: what to send and how often it was tried."""

    notification: Notification
    message: bytes
    attempts: int
