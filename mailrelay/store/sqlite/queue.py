"""
The SQLite store's intake: storing an accepted notification (its row, its body, its queue
entry and its day's count, SMS credits taken with it), and the counts the intake's limits and
the health page read (accepted since, queue entries by state).

An enqueue goes to the home file's writer, which batches consecutive ones into one
transaction and one commit (:class:`_Enqueue`); its Deferred fires once the message is on
disk.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path

from twisted.internet.defer import Deferred

from mailrelay.ids import NotificationIdGenerator
from mailrelay.interfaces import AlreadyExists
from mailrelay.model import (
    MessageText,
    Notification,
    QueueState,
    QueueStats,
    joinText,
    textPieces,
)
from mailrelay.store.common import recipientsJSON, toMillis
from mailrelay.store.sqlite.accounts import AccountData, takeCredits
from mailrelay.store.sqlite.bodies import EXTERNAL_BODY_MIN, SegmentWriter
from mailrelay.store.sqlite.files import requireId, total
from mailrelay.store.sqlite.statements import insertRows
from mailrelay.store.sqlite.threads import Work

QUEUE_STATES: tuple[QueueState, ...] = ("queued", "deferred", "in_flight", "held")
DAY_MS = 86_400_000
"""A day in milliseconds: ``daily_counts`` counts by ``received_at // DAY_MS``."""


class Intake(AccountData):
    """The :class:`~mailrelay.interfaces.IStore` methods of the intake, part of
    :class:`~mailrelay.store.sqlite.store.SQLiteStore`: enqueues to the home file of its
    ``_files``, with ids from its ``_newId``, SMS credits taken from the accounts."""

    _newId: NotificationIdGenerator

    def nextNotificationId(self) -> str:
        return self._newId()

    def enqueue(
        self, notification: Notification, message: MessageText, smsCredits: int = 0
    ) -> Deferred[None]:
        files = self._files
        pieces = textPieces(message)
        work = _Enqueue(notification, pieces, sum(map(len, pieces)), files.segments)
        if smsCredits <= 0:
            return files.writer.submit(work)
        charge = partial(takeCredits, account=notification.account, credits=smsCredits)
        if files.home == files.path:
            # The accounts are in this file: credits and message in one transaction.
            return self._changeAccountData(_EnqueueCharged(work, charge))
        return Deferred.fromCoroutine(self._enqueueChargedElsewhere(work, charge, smsCredits))

    async def _enqueueChargedElsewhere(self, work: _Enqueue, charge: Work, credits: int) -> None:
        """A worker process: the accounts are in the main file, the message goes to this
        process's own, so the credits are taken first (atomically, in the main file) and
        given back if the message cannot be stored. A crash in between loses them."""
        await self._changeAccountData(charge)
        try:
            await self._files.writer.submit(work)
        except BaseException:
            refund = partial(takeCredits, account=work.notification.account, credits=-credits)
            await self._changeAccountData(refund)
            raise

    def acceptedSince(self, account: str, since: datetime) -> Deferred[int]:
        work = partial(_acceptedSince, account=account, since=toMillis(since))
        return self._files.reader.submitEach(work).addCallback(total)

    def stats(self) -> Deferred[QueueStats]:
        def add(parts: list[tuple[Path, QueueStats]]) -> QueueStats:
            counts = {state: sum(getattr(p, state) for _, p in parts) for state in QUEUE_STATES}
            return QueueStats(**counts)

        return self._files.counter.submitEach(_stats).addCallback(add)


# The work functions below run on the writer thread, inside a transaction it manages, or on the
# reader thread in autocommit mode.


@dataclass(frozen=True)
class _Enqueue:
    """The write of one accepted notification; the writer batches consecutive ones."""

    notification: Notification
    message: tuple[bytes | memoryview, ...]  # in pieces, joined only if stored in the row
    size: int
    segments: SegmentWriter  # where the body goes if it is EXTERNAL_BODY_MIN or larger

    def __call__(self, connection: sqlite3.Connection) -> None:
        _enqueueAll(connection, [self])

    @staticmethod
    def runBatch(connection: sqlite3.Connection, works: Sequence[_Enqueue]) -> list[None]:
        _enqueueAll(connection, works)
        return [None] * len(works)


@dataclass(frozen=True)
class _EnqueueCharged:
    """An enqueue that takes SMS credits in its own transaction (no batch: it may fail alone)."""

    work: _Enqueue
    charge: Work

    def __call__(self, connection: sqlite3.Connection) -> None:
        self.charge(connection)
        _enqueueAll(connection, [self.work])


def _enqueueAll(connection: sqlite3.Connection, works: Sequence[_Enqueue]) -> None:
    """Insert notifications (their recipients in their row, which implies their CAAS_RECEIVED
    events), bodies and queue entries: one multi-row insert per table for all of them
    (:func:`~mailrelay.store.sqlite.statements.insertRows`). The large bodies are written to a
    segment file first, all together, and are on disk before the rows that point at them are
    inserted."""
    notifications, queue = [], []
    messages: list[tuple[int, bytes, *tuple[int | None, ...]]] = []
    large = [work.message for work in works if work.size >= EXTERNAL_BODY_MIN]
    locations = iter(works[0].segments.append(large) if large else ())
    perDay: Counter[tuple[str, int]] = Counter()
    for work in works:
        notification = work.notification
        number = requireId(notification.notification_id)
        receivedAt = toMillis(notification.received_at)
        options = notification.options
        notifications.append(
            (
                number,
                notification.account,
                notification.sender,
                notification.size,
                receivedAt,
                options.bulk_id,
                options.notify_url,
                options.notify_content_type,
                options.callback_data,
                int(options.intermediate_report),
                options.tracking_url,
                notification.client_address,
                notification.helo,
                recipientsJSON(notification.recipients),
            )
        )
        if work.size >= EXTERNAL_BODY_MIN:
            where = next(locations)
            crc, crc32c = (None, where.crc) if where.castagnoli else (where.crc, None)
            messages.append((number, b"", where.segment, where.offset, where.length, crc, crc32c))
        else:
            messages.append((number, joinText(work.message), None, None, None, None, None))
        queue.append((number, receivedAt, "queued"))
        perDay[notification.account, receivedAt // DAY_MS] += 1
    try:
        insertRows(
            connection,
            "notifications (id, account, sender, size, received_at, bulk_id, notify_url, "
            "notify_content_type, callback_data, intermediate_report, tracking_url, "
            "client_address, helo, recipient_list)",
            notifications,
        )
    except sqlite3.IntegrityError:
        ids = ", ".join(w.notification.notification_id for w in works)
        raise AlreadyExists(f"notification exists already: {ids}") from None
    insertRows(
        connection,
        "messages (notification_id, body, body_segment, body_offset, body_length, body_crc, "
        "body_crc32c)",
        messages,
    )
    insertRows(connection, "queue (notification_id, next_attempt, state)", queue)
    insertRows(
        connection,
        "daily_counts (account, day, accepted)",
        [(account, day, count) for (account, day), count in perDay.items()],
        " ON CONFLICT (account, day) DO UPDATE SET accepted = accepted + excluded.accepted",
    )


def _acceptedSince(connection: sqlite3.Connection, account: str, since: int) -> int:
    if since % DAY_MS == 0:  # since a midnight (the daily quota): the per-day counts
        (count,) = connection.execute(
            "SELECT COALESCE(SUM(accepted), 0) FROM daily_counts WHERE account = ? AND day >= ?",
            (account, since // DAY_MS),
        ).fetchone()
    else:
        (count,) = connection.execute(
            "SELECT COUNT(*) FROM notifications WHERE account = ? AND received_at >= ?",
            (account, since),
        ).fetchone()
    return int(count)


def _stats(connection: sqlite3.Connection) -> QueueStats:
    counts = dict.fromkeys(QUEUE_STATES, 0)
    for state, count in connection.execute("SELECT state, COUNT(*) FROM queue GROUP BY state"):
        counts[state] = count
    return QueueStats(**counts)
