"""
The SQLite store's delivery queue: claims of due entries under a lease, the writes about a
claimed notification (renewing its lease, recording an outcome with its status events and
reports, giving it back), and the operator's view and changes of the queue (list, retry now,
hold, release, delete).

A claim from one file (a worker's, or the main file when no other is left to it; see
:meth:`~mailrelay.store.sqlite.files.StoreFiles.claimFiles`) reads its due entries (ranges of
the queue's index by state and due time) and claims them in one write. A claim from several
reads the due entries of each on the reader thread, then claims each file's share in a write
that takes only those still due. Every later write about a claimed notification is one
transaction on the file that holds it, which checks the lease token in that transaction
(LeaseLost, nothing written, if it is not current).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.logger import Logger

from mailrelay.interfaces import LeaseLost, NotFound, StoreError
from mailrelay.model import (
    Delivery,
    FirstAttempt,
    PendingReport,
    QueueItem,
    QueueState,
    Recipient,
    StatusEvent,
)
from mailrelay.store.common import (
    fairShare,
    fromMillis,
    idNumber,
    pendingJSON,
    pendingPositions,
    recipientsAt,
    toMillis,
    withoutFinished,
)
from mailrelay.store.sqlite import reports as outbox
from mailrelay.store.sqlite.bodies import dropBody, messageBodies
from mailrelay.store.sqlite.files import NumberedWork, StoreFiles, firstFound, snapshot, total
from mailrelay.store.sqlite.queue import QUEUE_STATES
from mailrelay.store.sqlite.statements import inChunks, rowsAtOnce, withList
from mailrelay.store.sqlite.threads import Ahead
from mailrelay.store.sqlite.trails import insertEvents, loadNotifications, storedRecipients


class DeliveryQueue:
    """The :class:`~mailrelay.interfaces.IStore` methods of the delivery queue, part of
    :class:`~mailrelay.store.sqlite.store.SQLiteStore`: the queue entries in every file of its
    ``_files``, as the delivery workers and the operator see them."""

    _files: StoreFiles
    log = Logger()

    # -- claims and leases --

    def claimDue(
        self, limit: int, leaseSeconds: float, firstAttempt: FirstAttempt | None = None
    ) -> Deferred[list[Delivery]]:
        return Deferred.fromCoroutine(self._claimDue(limit, leaseSeconds, firstAttempt))

    async def _claimDue(
        self, limit: int, leaseSeconds: float, firstAttempt: FirstAttempt | None
    ) -> list[Delivery]:
        if limit <= 0:
            return []
        files = self._files
        now = files.now()
        leaseUntil = now + int(leaseSeconds * 1000)
        claim = partial(_claimEntries, now=now, leaseUntil=leaseUntil, firstAttempt=firstAttempt)
        scope = files.claimFiles()
        if len(scope) == 1:
            # One file (a worker's own, or the main file alone): its oldest due entries are
            # read and claimed in one write, a single trip to the writer thread and back. A
            # failure is the caller's to report (the queue cannot be read).
            (file,) = scope
            work = partial(_claimOldestDue, limit=limit, now=now, claim=claim)
            return self._claimed(file, await files.writer.submit(Ahead(work), file))
        # Several files: the oldest due entries of each kind in every file (an index range
        # each), the share of each chosen over all files, then each file's share claimed in
        # its own write, which takes only those still due: another claimer may have come first.
        dueEntries = partial(_dueEntries, limit=limit, now=now)
        dueIn = await gatherResults([files.reader.submit(dueEntries, file) for file in scope])
        due = list(zip(scope, dueIn, strict=True))
        fresh = sorted((key, file) for file, (keys, _) in due for key in keys)
        retries = sorted((key, file) for file, (_, keys) in due for key in keys)
        chosen = fairShare(fresh, retries, limit)
        deliveries: list[Delivery] = []
        for file in dict.fromkeys(file for _, file in chosen):
            work = partial(claim, numbers=[number for (_, number), f in chosen if f == file])
            try:
                result = await files.writer.submit(Ahead(work), file)
            except StoreError as e:
                # What the other files gave is claimed already: hand it out rather than leave
                # it in flight until its lease runs out.
                self.log.warn("claim: {file} failed: {error}", file=str(file), error=str(e))
                continue
            deliveries += self._claimed(file, result)
        rank = {number: i for i, ((_, number), _) in enumerate(chosen)}
        return sorted(deliveries, key=lambda d: rank[int(d.notification.notification_id)])

    def _claimed(
        self, file: Path, result: tuple[list[Delivery], list[tuple[int, str]]]
    ) -> list[Delivery]:
        """The deliveries of a claim's write in ``file``, each remembered as in that file;
        the notifications whose body could not be read are logged (they stay queued, and are
        reported at every claim, without holding up the others)."""
        claimed, unreadable = result
        for delivery in claimed:
            self._files.rememberFile(int(delivery.notification.notification_id), file)
        for number, error in unreadable:
            self.log.error("claim: notification {id} left queued: {error}", id=number, error=error)
        return claimed

    def renewLease(self, notificationId: str, lease: str, leaseSeconds: float) -> Deferred[None]:
        until = self._files.now() + int(leaseSeconds * 1000)
        return self._leaseWrite(notificationId, partial(_renewLease, lease=lease, until=until))

    def releaseLease(self, notificationId: str, lease: str) -> Deferred[None]:
        work = partial(_releaseLease, lease=lease, now=self._files.now())
        return self._leaseWrite(notificationId, work)

    def _leaseWrite(self, notificationId: str, work: NumberedWork) -> Deferred[Any]:
        """``work`` on the file of a notification in flight; LeaseLost if no file has it."""
        lost = LeaseLost(f"not queued: {notificationId}")
        return Deferred.fromCoroutine(self._files.onItsFile(notificationId, work, lost))

    def recordOutcome(
        self,
        notificationId: str,
        lease: str,
        events: Iterable[StatusEvent],
        finished: Iterable[Recipient],
        nextAttempt: datetime | None,
        reports: Iterable[PendingReport] = (),
    ) -> Deferred[None]:
        events, reports = tuple(events), tuple(reports)
        if any(event.notification_id != notificationId for event in events) or any(
            report.notification_id != notificationId for report in reports
        ):
            error = f"recordOutcome: events of another notification than {notificationId}"
            return fail(StoreError(error))
        work = partial(
            _recordOutcome,
            lease=lease,
            events=events,
            finished=tuple(finished),
            nextAttempt=None if nextAttempt is None else toMillis(nextAttempt),
            reports=reports,
            now=self._files.now(),
        )
        return Deferred.fromCoroutine(self._recordOutcome(notificationId, work))

    async def _recordOutcome(self, notificationId: str, work: NumberedWork) -> None:
        # The file's write awaited here, not through _leaseWrite's Deferred: one layer less
        # for the write made once a delivered message.
        lost = LeaseLost(f"not queued: {notificationId}")
        segment = await self._files.onItsFile(notificationId, work, lost)
        await self._files.sweep(notificationId, segment)

    # -- the operator's view and changes --

    def queueItems(
        self, state: QueueState | None, account: str | None, limit: int
    ) -> Deferred[list[QueueItem]]:
        work = partial(_queueItems, state=state, account=account, limit=limit)
        return self._files.reader.submitEach(work).addCallback(
            lambda parts: sorted(
                (item for _, items in parts for item in items),
                key=lambda item: (item.next_attempt, int(item.notification_id)),
            )[:limit]
        )

    def queueItem(self, notificationId: str) -> Deferred[QueueItem | None]:
        if idNumber(notificationId) is None:
            return succeed(None)
        work = partial(_queueItem, number=int(notificationId))
        return self._files.reader.submitEach(work).addCallback(firstFound)

    def retryNow(self, notificationId: str | None) -> Deferred[int]:
        return self._queueChange(notificationId, partial(_retryNow, now=self._files.now()))

    def hold(self, notificationId: str | None, account: str | None) -> Deferred[int]:
        if notificationId is None and account is None:
            return fail(StoreError("hold: name a notification or an account"))
        return self._queueChange(notificationId, partial(_hold, account=account))

    def release(self, notificationId: str | None, account: str | None) -> Deferred[int]:
        work = partial(_release, account=account, now=self._files.now())
        return self._queueChange(notificationId, work)

    def _queueChange(self, notificationId: str | None, work: NumberedWork) -> Deferred[int]:
        """``work(connection, number=...)``, which counts what it changed: on the file of the
        notification named (0 if there is none), or with None on every file (the sum)."""
        if notificationId is None:
            return self._files.writer.submitEach(partial(work, number=None)).addCallback(total)
        if idNumber(notificationId) is None:
            return succeed(0)
        d = Deferred.fromCoroutine(self._files.onItsFile(notificationId, work, None))
        return d.addCallback(lambda count: count or 0)

    def deleteQueued(
        self, notificationId: str, statusText: str, at: datetime
    ) -> Deferred[list[Recipient]]:
        return Deferred.fromCoroutine(self._deleteQueued(notificationId, statusText, at))

    async def _deleteQueued(
        self, notificationId: str, statusText: str, at: datetime
    ) -> list[Recipient]:
        work = partial(_deleteQueued, statusText=statusText, at=toMillis(at))
        failed, segment = await self._files.onItsFile(
            notificationId, work, NotFound(f"not in the queue: {notificationId}")
        )
        await self._files.sweep(notificationId, segment)
        return failed


# The work functions below run on a database thread, inside a transaction the thread manages
# (writes) or in autocommit mode (reads).

_DUE_STATES = ("queued", "deferred", "in_flight")
_DUE_OF_STATE = (
    "(SELECT json_group_array(json_array(next_attempt, notification_id)) FROM "
    "(SELECT next_attempt, notification_id FROM queue WHERE state = ? AND next_attempt <= ? "
    "ORDER BY next_attempt, notification_id LIMIT ?))"
)
_DUE = "SELECT " + ", ".join([_DUE_OF_STATE] * len(_DUE_STATES))
"""Due entries of each state, oldest first (a range of queue_by_state_due each), each state's
as one JSON value: all of them in one step (see statements.py)."""


def _dueEntries(
    connection: sqlite3.Connection, limit: int, now: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """This file's oldest due entries, as (next_attempt, id): up to ``limit`` never tried
    (``queued``), and up to ``limit`` retries (``deferred``, and ``in_flight`` whose lease
    has run out)."""
    parameters = [value for state in _DUE_STATES for value in (state, now, limit)]
    due = connection.execute(_DUE, parameters).fetchone()
    fresh, deferred, lapsed = (sorted((at, number) for at, number in json.loads(d)) for d in due)
    return fresh, sorted(deferred + lapsed)[:limit]


def _claimOldestDue(
    connection: sqlite3.Connection,
    limit: int,
    now: int,
    claim: partial[tuple[list[Delivery], list[tuple[int, str]]]],
) -> tuple[list[Delivery], list[tuple[int, str]]]:
    """``claim`` (:func:`_claimEntries` with its lease given) of this file's oldest entries due
    at ``now``, up to ``limit``, shared between never tried and retries as :func:`fairShare`
    shares them."""
    fresh, retries = _dueEntries(connection, limit, now)
    chosen = fairShare(fresh, retries, limit)
    return claim(connection, numbers=[number for _, number in chosen])


_CLAIMABLE = (
    "SELECT json_group_array(json_array(notification_id, state, attempts, pending, "
    "hold_requested)) FROM queue WHERE notification_id IN (?*) AND state != 'held' "
    "AND next_attempt <= ?"
)
_HOLD_LAPSED = (
    "UPDATE queue SET state = 'held', lease = NULL, hold_requested = 0 "
    "WHERE notification_id IN (?*)"
)
_CLAIM = (
    "UPDATE queue SET state = 'in_flight', next_attempt = ?, attempts = attempts + 1, "
    "lease = ? || '.' || notification_id WHERE notification_id IN (?*)"
)


def _claimEntries(
    connection: sqlite3.Connection,
    numbers: Sequence[int],
    now: int,
    leaseUntil: int,
    firstAttempt: FirstAttempt | None = None,
) -> tuple[list[Delivery], list[tuple[int, str]]]:
    """Claim the entries ``numbers`` that are still due, in that order, each under a new
    lease, with what ``firstAttempt`` gives for those claimed for their first attempt.
    Returns them, and the notifications left unclaimed because their body cannot be read,
    with why. A few statements for all of them (see statements.py)."""
    due: dict[int, tuple[int, str | None]] = {}
    lapsedHeld = []
    for chunk in inChunks(numbers):
        for number, state, attempts, pending, holdRequested in rowsAtOnce(
            connection, withList(_CLAIMABLE, chunk), (*chunk, now)
        ):
            if state == "in_flight" and holdRequested:
                # Its worker died while an operator held it: held, as a retry would have made it.
                lapsedHeld.append(number)
            else:
                due[number] = (attempts, pending)
    for chunk in inChunks(lapsedHeld):
        connection.execute(withList(_HOLD_LAPSED, chunk), chunk)
    bodies = messageBodies(connection, list(due))
    unreadable = [(n, str(b)) for n, b in bodies.items() if isinstance(b, StoreError)]
    claimed = [n for n in numbers if n in due and isinstance(bodies.get(n), bytes)]
    token = secrets.token_hex(8)
    for chunk in inChunks(claimed):
        connection.execute(withList(_CLAIM, chunk), (leaseUntil, token, *chunk))
    notifications = loadNotifications(connection, claimed)
    deliveries = []
    started: list[StatusEvent] = []
    reports: list[PendingReport] = []
    for number in claimed:
        attempts, pending = due[number]
        recipients = notifications[number].recipients  # the queue row's foreign key
        body = bodies[number]
        assert isinstance(body, bytes)
        delivery = Delivery(
            notification=notifications[number],
            message=body,
            pending=recipientsAt(recipients, pendingPositions(recipients, pending)),
            attempts=attempts + 1,
            lease=f"{token}.{number}",
        )
        if firstAttempt is not None and delivery.attempts == 1:
            events, reported = firstAttempt(delivery)
            started += events
            reports += reported
        deliveries.append(delivery)
    insertEvents(connection, tuple(started))
    outbox.addReports(connection, reports, now)
    return deliveries, unreadable


class _Leased(NamedTuple):
    """What the writes about an entry in flight read of it, with its notification's
    recipients (in one statement: each statement is a turn for the GIL)."""

    attempts: int
    pending: str | None
    holdRequested: bool
    recipientList: str | None


_LEASED = (
    "SELECT q.lease, q.attempts, q.pending, q.hold_requested, n.recipient_list "
    "FROM queue AS q JOIN notifications AS n ON n.id = q.notification_id "
    "WHERE q.notification_id = ? AND q.state = 'in_flight'"
)


def _leased(connection: sqlite3.Connection, number: int, lease: str) -> _Leased:
    """The entry in flight under ``lease``; LeaseLost if that is not its current lease (or
    it is not in flight)."""
    row = connection.execute(_LEASED, (number,)).fetchone()
    if row is None or row[0] != lease:
        raise LeaseLost(f"the lease on {number} is not current")
    return _Leased(row[1], row[2], bool(row[3]), row[4])


def _renewLease(connection: sqlite3.Connection, number: int, lease: str, until: int) -> None:
    _leased(connection, number, lease)
    connection.execute(
        "UPDATE queue SET next_attempt = ? WHERE notification_id = ?", (until, number)
    )


def _recordOutcome(
    connection: sqlite3.Connection,
    number: int,
    lease: str,
    events: tuple[StatusEvent, ...],
    finished: tuple[Recipient, ...],
    nextAttempt: int | None,
    reports: tuple[PendingReport, ...] = (),
    now: int = 0,
) -> int | None:
    """The write of :meth:`DeliveryQueue.recordOutcome`. Returns the body segment it left
    unreferenced, if any, to be deleted once this has committed."""
    entry = _leased(connection, number, lease)
    insertEvents(connection, events)
    outbox.addReports(connection, reports, now)
    recipients = storedRecipients(connection, number, entry.recipientList)
    left = withoutFinished(recipients, pendingPositions(recipients, entry.pending), finished)
    if not left:
        connection.execute("DELETE FROM queue WHERE notification_id = ?", (number,))
        return dropBody(connection, number)
    if nextAttempt is None:
        connection.execute(
            "UPDATE queue SET pending = ? WHERE notification_id = ?", (pendingJSON(left), number)
        )
    else:
        connection.execute(
            "UPDATE queue SET state = ?, next_attempt = ?, pending = ?, lease = NULL, "
            "hold_requested = 0 WHERE notification_id = ?",
            ("held" if entry.holdRequested else "deferred", nextAttempt, pendingJSON(left), number),
        )
    return None


def _queuedRecipients(connection: sqlite3.Connection, number: int) -> tuple[Recipient, ...]:
    (recipientList,) = connection.execute(
        "SELECT recipient_list FROM notifications WHERE id = ?", (number,)
    ).fetchone()
    return storedRecipients(connection, number, recipientList)


def _releaseLease(connection: sqlite3.Connection, number: int, lease: str, now: int) -> None:
    entry = _leased(connection, number, lease)
    attempts = max(entry.attempts - 1, 0)
    state = "held" if entry.holdRequested else "queued" if attempts == 0 else "deferred"
    connection.execute(
        "UPDATE queue SET state = ?, next_attempt = ?, attempts = ?, lease = NULL, "
        "hold_requested = 0 WHERE notification_id = ?",
        (state, now, attempts, number),
    )


_QUEUE_ITEMS = (
    "SELECT q.notification_id, q.state, q.next_attempt, q.attempts, q.pending, n.account, "
    "n.sender, n.received_at, n.size, n.recipient_list "
    "FROM queue AS q JOIN notifications AS n ON n.id = q.notification_id "
)


def _queueItemFromRow(connection: sqlite3.Connection, row: Sequence[Any]) -> QueueItem:
    number, state, nextAttempt, attempts, pending, account, sender, received, size, listed = row
    recipients = storedRecipients(connection, number, listed)
    return QueueItem(
        notification_id=str(number),
        account=account,
        sender=sender,
        state=state,
        next_attempt=fromMillis(nextAttempt),
        attempts=attempts,
        pending=recipientsAt(recipients, pendingPositions(recipients, pending)),
        received_at=fromMillis(received),
        size=size,
    )


def _queueItems(
    connection: sqlite3.Connection, state: QueueState | None, account: str | None, limit: int
) -> list[QueueItem]:
    """This file's first ``limit`` entries (by next attempt) of ``state`` (None: of each
    state), of ``account`` (None: of every one)."""
    items = []
    with snapshot(connection):
        for each in (state,) if state is not None else QUEUE_STATES:
            rows = connection.execute(
                _QUEUE_ITEMS + "WHERE q.state = ? AND (? IS NULL OR n.account = ?) "
                "ORDER BY q.next_attempt, q.notification_id LIMIT ?",
                (each, account, account, limit),
            ).fetchall()
            items += [_queueItemFromRow(connection, row) for row in rows]
    return items


def _queueItem(connection: sqlite3.Connection, number: int) -> QueueItem | None:
    with snapshot(connection):
        row = connection.execute(_QUEUE_ITEMS + "WHERE q.notification_id = ?", (number,)).fetchone()
        return None if row is None else _queueItemFromRow(connection, row)


_OF_ACCOUNT = "(SELECT account FROM notifications WHERE id = queue.notification_id) = ?"
"""An account's queue entries: a look-up of each entry's notification (there is no index of
notifications by account, and the queue is the shorter list)."""


def _retryNow(connection: sqlite3.Connection, number: int | None, now: int) -> int:
    if number is not None:
        cursor = connection.execute(
            "UPDATE queue SET next_attempt = MIN(next_attempt, ?) "
            "WHERE notification_id = ? AND state IN ('queued', 'deferred')",
            (now, number),
        )
        return cursor.rowcount
    connection.execute(
        "UPDATE queue SET next_attempt = ? WHERE state IN ('queued', 'deferred') "
        "AND next_attempt > ?",
        (now, now),
    )
    (count,) = connection.execute(
        "SELECT COUNT(*) FROM queue WHERE state IN ('queued', 'deferred')"
    ).fetchone()
    return int(count)


def _hold(connection: sqlite3.Connection, number: int | None, account: str | None) -> int:
    """Hold the entry ``number``, or (None) every entry of ``account``; returns how many of
    them are held now (entries in flight are marked, to be held when their attempt ends)."""
    where, args = (
        ("notification_id = ?", (number,)) if number is not None else (_OF_ACCOUNT, (account,))
    )
    connection.execute(
        f"UPDATE queue SET state = 'held' WHERE state IN ('queued', 'deferred') AND {where}",  # noqa: S608
        args,
    )
    connection.execute(
        f"UPDATE queue SET hold_requested = 1 WHERE state = 'in_flight' AND {where}",  # noqa: S608
        args,
    )
    (count,) = connection.execute(
        f"SELECT COUNT(*) FROM queue WHERE state = 'held' AND {where}",  # noqa: S608
        args,
    ).fetchone()
    return int(count)


def _release(
    connection: sqlite3.Connection, number: int | None, account: str | None, now: int
) -> int:
    """Release the entry ``number``, or (None) every entry of ``account``, or (both None)
    every entry: held ones are due at once, and in-flight ones no longer to be held."""
    args: tuple[Any, ...]
    if number is not None:
        where, args = "notification_id = ?", (number,)
    elif account is not None:
        where, args = _OF_ACCOUNT, (account,)
    else:
        where, args = "1", ()
    cursor = connection.execute(
        "UPDATE queue SET state = CASE WHEN attempts = 0 THEN 'queued' ELSE 'deferred' END, "  # noqa: S608
        f"next_attempt = ? WHERE state = 'held' AND {where}",
        (now, *args),
    )
    released = cursor.rowcount
    connection.execute(
        "UPDATE queue SET hold_requested = 0 WHERE state = 'in_flight' AND hold_requested = 1 "  # noqa: S608
        f"AND {where}",
        args,
    )
    return released


def _deleteQueued(
    connection: sqlite3.Connection, number: int, statusText: str, at: int
) -> tuple[list[Recipient], int | None]:
    """Fail the pending recipients of queue entry ``number`` with CAAS_FAILED and take it
    out of the queue. Returns them, and the body segment left unreferenced (if any)."""
    row = connection.execute(
        "SELECT pending FROM queue WHERE notification_id = ?", (number,)
    ).fetchone()
    if row is None:
        raise NotFound(f"not in the queue: {number}")
    recipients = _queuedRecipients(connection, number)
    failed = recipientsAt(recipients, pendingPositions(recipients, row[0]))
    insertEvents(
        connection,
        tuple(
            StatusEvent(str(number), recipient, "CAAS_FAILED", statusText, fromMillis(at))
            for recipient in failed
        ),
    )
    connection.execute("DELETE FROM queue WHERE notification_id = ?", (number,))
    return list(failed), dropBody(connection, number)
