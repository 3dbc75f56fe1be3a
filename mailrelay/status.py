"""
The status trail as customers see it (SPEC §7): the one place that renders it.

The HTTP status API and ``mailrelay status`` both print :func:`statusDocument`'s result, so the
two can never disagree.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from mailrelay.model import Recipient, StatusEvent


def formatTimestamp(moment: datetime) -> str:
    """``YYYY-MM-DD HH:MM:SS.mmm`` in UTC (a naive datetime is taken to be UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def recipientMatches(recipient: Recipient, recipientFilter: str) -> bool:
    """
    Whether ``recipient`` is the one ``recipientFilter`` (``email:<addr>`` or ``sms:<number>``)
    names. E-mail addresses compare without regard to case; numbers by their digits, so
    ``sms:+4477…``, ``sms:004477…`` and ``sms: 4477…`` (a ``+`` decoded from a query string as a
    space) all name ``+4477…``.
    """
    channel, sep, address = recipientFilter.partition(":")
    if not sep or channel != recipient.channel:
        return False
    if channel == "sms":
        return _digits(address) == _digits(recipient.address)
    return address.strip().casefold() == recipient.address.casefold()


def _digits(number: str) -> str:
    digits = "".join(c for c in number if c.isdigit())
    plus = number.strip().startswith("+")
    return digits[2:] if not plus and digits.startswith("00") else digits


def statusEntry(event: StatusEvent) -> dict[str, str]:
    """One element of the document's ``status`` list."""
    return {
        "statusCode": event.status_code,
        "statusText": event.status_text,
        "channel": event.recipient.channel,
        "recipient": event.recipient.key,
        "timestamp": formatTimestamp(event.timestamp),
    }


def statusDocument(
    notificationId: str, events: Iterable[StatusEvent], recipientFilter: str | None = None
) -> dict[str, Any]:
    """
    The JSON document (as a dict, ready for ``json.dumps``) of a notification's status trail:
    ``{"SAPnotification": {"notificationId": ..., "status": [...]}}``, events oldest first
    (events with equal timestamps keep the order given), only those of ``recipientFilter``'s
    recipient when one is given. An unknown notification simply has no events.
    """
    chosen = [
        event
        for event in events
        if recipientFilter is None or recipientMatches(event.recipient, recipientFilter)
    ]
    chosen.sort(key=lambda event: _sortKey(event.timestamp))
    return {
        "SAPnotification": {
            "notificationId": notificationId,
            "status": [statusEntry(event) for event in chosen],
        }
    }


def _sortKey(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
