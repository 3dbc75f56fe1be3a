"""
The status lookups of SPEC §7, for one authenticated account: by notification id and by bulk id.

Rendering is :func:`mailrelay.status.statusDocument`'s (the one renderer, shared with the admin
command); this module only decides *which* events a caller may see. A notification that is
unknown, received before the retention period, or another account's is answered exactly like one
that has no events, so a caller learns nothing about ids that are not its own.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from twisted.internet.interfaces import IReactorTime

from mailrelay.interfaces import IStore
from mailrelay.model import Notification, StatusEvent, fromTimestamp
from mailrelay.numbers import isDecimal
from mailrelay.policy.addresses import AddressSyntaxError, parseMailbox
from mailrelay.policy.phones import PhoneNumberError, normalisePhoneNumber
from mailrelay.status import statusDocument

RECIPIENT_PREFIXES = ("email:", "sms:")
_BAD_RECIPIENT = "recipient must be email:<address> or sms:<E.164 number>"
MAX_BULK_PAGE = 1000


class BadQuery(ValueError):
    """A query parameter has a value the API does not accept (answer 400 with this text)."""


def recipientFilter(values: list[str]) -> str | None:
    """
    The ``recipient`` parameter (``email:<addr>`` or ``sms:<E.164>``), if given, in the normal
    form RCPT gives the recipients it stores (IDNA domain, E.164 number), so that every way of
    writing one address finds it. BadQuery if it names no address or number.
    """
    if not values:
        return None
    value = values[0]
    if not value.startswith(RECIPIENT_PREFIXES) or len(value) > 320:
        raise BadQuery(_BAD_RECIPIENT)
    channel, _, address = value.partition(":")
    address = address.strip()
    try:
        if channel == "sms":
            return "sms:" + normalisePhoneNumber(address)
        return "email:" + str(parseMailbox(address))
    except PhoneNumberError:
        raise BadQuery(_BAD_RECIPIENT) from None  # fixed text: never echo the client's
    except AddressSyntaxError:
        local, at, domain = address.rpartition("@")
        if not (at and local and domain):
            raise BadQuery(_BAD_RECIPIENT) from None
        # local@domain, but not one RCPT would take (a name without a dot): it can match no
        # stored recipient, and an empty answer says so as well as a 400 would.
        return value


def pageLimit(values: list[str]) -> int:
    """The ``limit`` parameter of a bulk listing: 1..MAX_BULK_PAGE, default MAX_BULK_PAGE."""
    if not values:
        return MAX_BULK_PAGE
    text = values[0]
    if not isDecimal(text, 9) or not 1 <= int(text) <= MAX_BULK_PAGE:
        raise BadQuery(f"limit must be an integer from 1 to {MAX_BULK_PAGE}")
    return int(text)


def pageCursor(values: list[str]) -> str | None:
    """The ``after`` parameter of a bulk listing: a notification id, if given."""
    if not values:
        return None
    value = values[0]
    if not isDecimal(value, 20):
        raise BadQuery("after must be a notification id")
    return value


def idsAfter(ids: list[str], after: str | None) -> list[str]:
    """The ids of ``ids`` (oldest first) that come after the cursor ``after`` (an id)."""
    if after is None:
        return ids
    if after in ids:
        return ids[ids.index(after) + 1 :]
    # The cursor's notification may have expired meanwhile; ids are time-ordered integers.
    return [i for i in ids if i.isdigit() and int(i) > int(after)]


class NotificationStatus:
    """Status documents of one store, within ``retentionDays`` of the ``clock``'s now."""

    def __init__(self, store: IStore, clock: IReactorTime, retentionDays: int) -> None:
        self._store = store
        self._clock = clock
        self._retention = timedelta(days=retentionDays)

    def _visible(self, notification: Notification | None, account: str) -> bool:
        if notification is None or notification.account != account:
            return False
        oldest = fromTimestamp(self._clock.seconds()) - self._retention
        return notification.received_at >= oldest

    async def byId(
        self, account: str, notificationId: str, recipient: str | None = None
    ) -> dict[str, Any]:
        """The SPEC §7 document of ``notificationId`` as ``account`` may see it."""
        notification, events = await self._withTrail(notificationId)
        if not self._visible(notification, account):
            return statusDocument(notificationId, [])
        return statusDocument(notificationId, events, recipient)

    async def _withTrail(
        self, notificationId: str
    ) -> tuple[Notification | None, list[StatusEvent]]:
        """The notification and its trail, read together. (The trail of a notification the
        caller may not see is read, and not shown.)"""
        notification, trail = await self._store.notificationWithTrail(notificationId)
        return notification, list(trail)

    async def byBulk(
        self,
        account: str,
        bulkId: str,
        recipient: str | None = None,
        after: str | None = None,
        limit: int = MAX_BULK_PAGE,
    ) -> dict[str, Any]:
        """
        ``{"bulkId": ..., "notifications": [<SPEC §7 document>, ...], "next": <id> | null}``:
        up to ``limit`` of ``account``'s notifications carrying ``bulkId``, oldest first, those
        after the notification id ``after`` when given; ``next`` is the cursor of the next page.
        """
        ids = idsAfter(await self._store.notificationsForBulk(account, bulkId), after)
        documents: list[dict[str, Any]] = []
        scanned = 0
        for notificationId in ids:
            if len(documents) == limit:
                break
            scanned += 1
            notification, events = await self._withTrail(notificationId)
            if not self._visible(notification, account):
                continue
            documents.append(statusDocument(notificationId, events, recipient))
        nextCursor = ids[scanned - 1] if scanned < len(ids) else None
        return {"bulkId": bulkId, "notifications": documents, "next": nextCursor}
