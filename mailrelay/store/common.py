"""
What every store backend shares: timestamps as stored, notification ids as numbers, recipients
and the pending ones among them as kept, which due work a claim takes, and how long account
data may be remembered.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from mailrelay.model import STATUS_TEXTS, Recipient, StatusEvent
from mailrelay.numbers import isDecimal

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
    # 2**63 has 19 digits; a longer string is no id (and int() refuses past 4,300 digits).
    if isDecimal(notificationId, 19):
        number = int(notificationId)
        if number < 2**63 and str(number) == notificationId:
            return number
    return None


def recipientsJSON(recipients: Sequence[Recipient]) -> str:
    """A notification's recipients as both backends keep them: a JSON list of
    ``[address, channel]`` in RCPT order."""
    return json.dumps(
        [[r.address, r.channel] for r in recipients], ensure_ascii=False, separators=(",", ":")
    )


def recipientsFromJSON(data: str) -> tuple[Recipient, ...]:
    """The recipients :func:`recipientsJSON` wrote."""
    return tuple(
        Recipient(address=address, channel=channel) for address, channel in json.loads(data)
    )


def trailWithReceived(
    notificationId: str,
    recipients: Iterable[Recipient],
    receivedAt: datetime,
    later: Iterable[StatusEvent],
) -> list[StatusEvent]:
    """
    The status trail of a notification whose ``CAAS_RECEIVED`` events (one per recipient, at
    ``receivedAt``) are implied by its stored record instead of stored one by one, and whose
    ``later`` events are stored: all of them, oldest first. The implied events come first among
    events of the same moment, as stored ones written with the notification would (the sort is
    stable).
    """
    received = [
        StatusEvent(
            notification_id=notificationId,
            recipient=recipient,
            status_code="CAAS_RECEIVED",
            status_text=STATUS_TEXTS["CAAS_RECEIVED"],
            timestamp=receivedAt,
        )
        for recipient in recipients
    ]
    return sorted([*received, *later], key=lambda event: event.timestamp)


def pendingPositions(recipients: Sequence[Recipient], pending: str | None) -> list[int]:
    """The positions (in ``recipients``, from 0) of the recipients still pending, from what
    both backends keep: a JSON list of positions, or None for all of them."""
    if pending is None:
        return list(range(len(recipients)))
    return [int(position) for position in json.loads(pending)]


def pendingJSON(positions: Sequence[int]) -> str:
    """The positions of the pending recipients as both backends keep them."""
    return json.dumps(list(positions), separators=(",", ":"))


def recipientsAt(
    recipients: Sequence[Recipient], positions: Iterable[int]
) -> tuple[Recipient, ...]:
    """The recipients at ``positions``, in RCPT order."""
    return tuple(recipients[position] for position in sorted(positions))


def withoutFinished(
    recipients: Sequence[Recipient], positions: Iterable[int], finished: Iterable[Recipient]
) -> list[int]:
    """``positions`` less those whose recipient is one of ``finished``."""
    done = set(finished)
    return [position for position in positions if recipients[position] not in done]


Due = TypeVar("Due", bound=tuple[Any, ...])


def fairShare(fresh: Sequence[Due], retries: Sequence[Due], limit: int) -> list[Due]:
    """
    What a claim of ``limit`` takes from due work never tried (``fresh``) and due retries
    (deferred entries and lapsed leases), each a list of tuples that sort oldest first and
    sorted so: at least half of ``limit`` of each kind while it lasts (so that neither a
    backlog of retries nor a flood of new mail starves the other), the rest the oldest of what
    is left of both. The Redis claim script does the same in Lua. Returns them oldest first.
    """
    half = limit // 2
    takeFresh = min(len(fresh), half)
    takeRetries = min(len(retries), half)
    left = limit - takeFresh - takeRetries
    rest = sorted([*fresh[takeFresh:], *retries[takeRetries:]])[:left]
    return sorted([*fresh[:takeFresh], *retries[:takeRetries], *rest])
