"""
The SQLite store's notifications as the status API reads them: a notification, its status
trail (the ``CAAS_RECEIVED`` events its row implies, then the events stored), the
notifications of a bulk, adding events, and expiry of the notifications whose time is past.

Reads look in every file; a notification is in one of them. Expiry deletes in batches of
``EXPIRE_BATCH`` notifications looked at, a transaction each, so that the writer is free for
enqueues between them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred

from mailrelay.interfaces import NotFound
from mailrelay.model import HeaderOptions, Notification, Recipient, StatusEvent
from mailrelay.store.common import (
    fromMillis,
    idNumber,
    recipientsFromJSON,
    toMillis,
    trailWithReceived,
)
from mailrelay.store.sqlite import gatewayids
from mailrelay.store.sqlite.bodies import sweepUnreferenced
from mailrelay.store.sqlite.files import StoreFiles, firstFound, present, requireId, snapshot
from mailrelay.store.sqlite.queue import DAY_MS
from mailrelay.store.sqlite.statements import inChunks, insertRows, rowsAtOnce, withList

EXPIRE_BATCH = 500
"""Notifications one expiry write looks at: the writer is free for enqueues between them."""


class StatusTrails:
    """The :class:`~mailrelay.interfaces.IStore` methods of notifications and status trails,
    part of :class:`~mailrelay.store.sqlite.store.SQLiteStore`: in every file of its
    ``_files``; ``expireBatch``, the notifications one expiry write looks at."""

    _files: StoreFiles
    expireBatch = EXPIRE_BATCH

    def getNotification(self, notificationId: str) -> Deferred[Notification | None]:
        work = partial(_getNotification, notificationId=notificationId)
        return self._files.reader.submitEach(work).addCallback(firstFound)

    def addEvents(self, events: Iterable[StatusEvent]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._addEvents(tuple(events)))

    async def _addEvents(self, events: tuple[StatusEvent, ...]) -> None:
        # Nothing is stored if any notification is unknown: every file is looked in first.
        # The writes are then one transaction per file, so if one fails after another file's
        # went in, the caller sees the failure with part of the events stored.
        numbers = {requireId(e.notification_id) for e in events}
        found = await self._files.reader.submitEach(partial(present, numbers=tuple(numbers)))
        if set().union(*(there for _, there in found)) != numbers:
            raise NotFound("status events for an unknown notification")
        for file, there in found:
            mine = tuple(e for e in events if int(e.notification_id) in there)
            if mine:
                await self._files.writer.submit(partial(insertEvents, events=mine), file)

    def statusTrail(self, notificationId: str) -> Deferred[list[StatusEvent]]:
        d = self._files.reader.submitEach(partial(_statusTrail, notificationId=notificationId))
        return d.addCallback(lambda trails: [event for _, trail in trails for event in trail])

    def notificationWithTrail(
        self, notificationId: str
    ) -> Deferred[tuple[Notification | None, list[StatusEvent]]]:
        work = partial(_notificationWithTrail, notificationId=notificationId)
        d = self._files.reader.submitEach(work)
        return d.addCallback(lambda parts: firstFound(parts) or (None, []))

    def notificationsForBulk(self, account: str, bulkId: str) -> Deferred[list[str]]:
        work = partial(_notificationsForBulk, account=account, bulkId=bulkId)
        return self._files.reader.submitEach(work).addCallback(
            lambda parts: [str(n) for _, n in sorted(key for _, keys in parts for key in keys)]
        )

    def expire(self, before: datetime) -> Deferred[int]:
        return Deferred.fromCoroutine(self._expire(toMillis(before), self.expireBatch))

    async def _expire(self, before: int, batch: int) -> int:
        # A write per batch of notifications looked at, so that a long history (or a long
        # queue, whose notifications are looked at and kept) never holds the writer, and the
        # enqueues waiting for it, in one long statement. The first batch runs on every file
        # that is ready, the rest on each of those files in turn.
        writer = self._files.writer
        deleted = 0
        work = partial(_expireBatch, before=before, after=_EXPIRE_START, batch=batch)
        for file, (gone, after) in await writer.submitEach(work):
            deleted += gone
            while after is not None:
                work = partial(_expireBatch, before=before, after=after, batch=batch)
                gone, after = await writer.submit(work, file)
                deleted += gone
        await writer.submitEach(partial(_expireFinish, before=before, now=self._files.now()))
        return deleted


# The work functions below run on a database thread, inside a transaction the thread manages
# (writes) or in autocommit mode (reads).


def loadNotification(connection: sqlite3.Connection, number: int) -> Notification | None:
    """Notification ``number`` as stored in this file, or None if it has no such one."""
    return loadNotifications(connection, [number]).get(number)


_NOTIFICATIONS = (
    "SELECT json_group_array(json_array(id, account, sender, size, received_at, bulk_id, "
    "notify_url, notify_content_type, callback_data, intermediate_report, tracking_url, "
    "client_address, helo, recipient_list)) FROM notifications WHERE id IN (?*)"
)


def loadNotifications(
    connection: sqlite3.Connection, numbers: Sequence[int]
) -> dict[int, Notification]:
    """The notifications ``numbers`` that this file holds, by number (one query)."""
    return {
        row[0]: _notificationOf(connection, row)
        for chunk in inChunks(numbers)
        for row in rowsAtOnce(connection, withList(_NOTIFICATIONS, chunk), chunk)
    }


def _notificationOf(connection: sqlite3.Connection, row: Sequence[Any]) -> Notification:
    number = row[0]
    return Notification(
        notification_id=str(number),
        account=row[1],
        sender=row[2],
        recipients=storedRecipients(connection, number, row[13]),
        size=row[3],
        received_at=fromMillis(row[4]),
        options=HeaderOptions(
            bulk_id=row[5],
            notify_url=row[6],
            notify_content_type=row[7],
            callback_data=row[8],
            intermediate_report=bool(row[9]),
            tracking_url=row[10],
        ),
        client_address=row[11],
        helo=row[12],
    )


def storedRecipients(
    connection: sqlite3.Connection, number: int, recipientList: str | None
) -> tuple[Recipient, ...]:
    """Notification ``number``'s recipients, in RCPT order, from its ``recipient_list``."""
    if recipientList is not None:
        return recipientsFromJSON(recipientList)
    # Accepted before schema version 4: a row per recipient.
    return tuple(
        Recipient(address=address, channel=channel)
        for address, channel in connection.execute(
            "SELECT address, channel FROM recipients WHERE notification_id = ? ORDER BY position",
            (number,),
        )
    )


def _getNotification(connection: sqlite3.Connection, notificationId: str) -> Notification | None:
    number = idNumber(notificationId)
    if number is None:
        return None
    with snapshot(connection):  # the notification and its recipients (before schema 4)
        return loadNotification(connection, number)


def insertEvents(connection: sqlite3.Connection, events: tuple[StatusEvent, ...]) -> None:
    """Store ``events``, of notifications in this file (NotFound if one is not)."""
    rows = []
    for event in events:
        number = requireId(event.notification_id)
        rows.append(
            (
                number,
                event.recipient.address,
                event.recipient.channel,
                event.status_code,
                event.status_text,
                toMillis(event.timestamp),
            )
        )
    try:
        insertRows(
            connection,
            "status_events (notification_id, address, channel, status_code, status_text, ts)",
            rows,
        )
    except sqlite3.IntegrityError:
        # The foreign key: events for a notification this store does not have (or expired).
        raise NotFound("status events for an unknown notification") from None


def _statusTrail(connection: sqlite3.Connection, notificationId: str) -> list[StatusEvent]:
    number = idNumber(notificationId)
    if number is None:
        return []
    with snapshot(connection):  # the notification and its events
        return _trailOf(connection, number, notificationId)


def _notificationWithTrail(
    connection: sqlite3.Connection, notificationId: str
) -> tuple[Notification, list[StatusEvent]] | None:
    """The notification and its trail, if this file holds it (its events are in its file)."""
    number = idNumber(notificationId)
    if number is None:
        return None
    with snapshot(connection):
        notification = loadNotification(connection, number)
        if notification is None:
            return None
        return notification, _trailOf(connection, number, notificationId)


def _trailOf(connection: sqlite3.Connection, number: int, notificationId: str) -> list[StatusEvent]:
    """The trail of notification ``number``, read inside the caller's snapshot."""
    head = connection.execute(
        "SELECT received_at, recipient_list FROM notifications WHERE id = ?", (number,)
    ).fetchone()
    rows = connection.execute(
        "SELECT address, channel, status_code, status_text, ts FROM status_events "
        "WHERE notification_id = ? ORDER BY ts, id",
        (number,),
    ).fetchall()
    trail = [
        StatusEvent(
            notification_id=notificationId,
            recipient=Recipient(address=address, channel=channel),
            status_code=code,
            status_text=text,
            timestamp=fromMillis(ts),
        )
        for address, channel, code, text, ts in rows
    ]
    if head is None or head[1] is None:
        return trail
    return trailWithReceived(
        notificationId, recipientsFromJSON(head[1]), fromMillis(head[0]), trail
    )


def _notificationsForBulk(
    connection: sqlite3.Connection, account: str, bulkId: str
) -> list[tuple[int, int]]:
    """The bulk's notifications in this file as (received_at, id), in that order."""
    return connection.execute(
        "SELECT received_at, id FROM notifications WHERE account = ? AND bulk_id = ? "
        "ORDER BY received_at, id",
        (account, bulkId),
    ).fetchall()


_EXPIRE_START = (-(2**63), -(2**63))
"""Where expiry starts: before every (received_at, id)."""


def _expireBatch(
    connection: sqlite3.Connection, before: int, after: tuple[int, int], batch: int
) -> tuple[int, tuple[int, int] | None]:
    """
    Look at up to ``batch`` notifications received before ``before`` that come after
    ``after`` in (received_at, id) order, through notifications_by_time, and delete those not
    in the queue (in any state), with everything kept about them. Returns how many went and
    where the next batch starts (None: none is left).
    """
    rows = connection.execute(
        "SELECT received_at, id FROM notifications WHERE received_at < ? "
        "AND (received_at, id) > (?, ?) ORDER BY received_at, id LIMIT ?",
        (before, *after, batch),
    ).fetchall()
    doomed = [
        (number,)
        for _, number in rows
        if connection.execute("SELECT 1 FROM queue WHERE notification_id = ?", (number,)).fetchone()
        is None
    ]
    # Recipients, bodies, status events and gateway ids go with their notification (ON DELETE
    # CASCADE); the reports and their attempts have no foreign key (schema 010).
    connection.executemany("DELETE FROM reports WHERE notification_id = ?", doomed)
    connection.executemany("DELETE FROM report_attempts WHERE notification_id = ?", doomed)
    connection.executemany("DELETE FROM notifications WHERE id = ?", doomed)
    return len(doomed), (rows[-1] if len(rows) == batch else None)


def _expireFinish(connection: sqlite3.Connection, before: int, now: int) -> None:
    """After the notifications: the counts of days wholly before ``before`` (no quota looks
    back that far), the gateway ids whose time has passed by ``now``, and the body segments
    no row refers to any more."""
    connection.execute("DELETE FROM daily_counts WHERE day < ?", (before // DAY_MS,))
    gatewayids.forgetPast(connection, now)
    sweepUnreferenced(connection)
