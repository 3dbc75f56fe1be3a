"""
The SQLite store's report outbox (:class:`~mailrelay.interfaces.IReportQueue`; tables in
``schema/010_reports.sql``): delivery reports waiting to be called back, claimed under a lease,
the attempts made, the notify URLs found gone for good.

A notification's reports are in the file that holds it, written in the very transaction that
records the events they are about (:func:`addReports`, also used by the delivery queue's
outcome); the work functions run inside the transaction their caller's thread manages.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from functools import partial

from twisted.internet.defer import Deferred, succeed

from mailrelay.interfaces import NotFound, StoreError
from mailrelay.model import ClaimedReport, PendingReport, ReportAttempt, StatusEvent
from mailrelay.store.common import fromMillis, idNumber, toMillis
from mailrelay.store.sqlite.files import StoreFiles, total
from mailrelay.store.sqlite.statements import inChunks, insertRows, withList
from mailrelay.store.sqlite.trails import insertEvents


class ReportOutbox:
    """The :class:`~mailrelay.interfaces.IReportQueue` methods, part of
    :class:`~mailrelay.store.sqlite.store.SQLiteStore`: the reports in every file of its
    ``_files``; the gone URLs in the main file."""

    _files: StoreFiles

    def addEventsWithReports(
        self, events: Iterable[StatusEvent], reports: Iterable[PendingReport]
    ) -> Deferred[None]:
        return Deferred.fromCoroutine(self._addEventsWithReports(tuple(events), tuple(reports)))

    async def _addEventsWithReports(
        self, events: tuple[StatusEvent, ...], reports: tuple[PendingReport, ...]
    ) -> None:
        ids = {e.notification_id for e in events} | {r.notification_id for r in reports}
        if len(ids) > 1:
            raise StoreError("addEventsWithReports: events of more than one notification")
        if not ids:
            return
        (notificationId,) = ids
        work = partial(_addEventsWithReports, events=events, reports=reports, now=self._files.now())
        await self._files.onItsFile(
            notificationId, work, NotFound("status events for an unknown notification")
        )

    def claimReports(self, limit: int, leaseSeconds: float) -> Deferred[list[ClaimedReport]]:
        return Deferred.fromCoroutine(self._claimReports(limit, leaseSeconds))

    async def _claimReports(self, limit: int, leaseSeconds: float) -> list[ClaimedReport]:
        if limit <= 0:
            return []
        now = self._files.now()
        work = partial(
            _claim,
            limit=limit,
            now=now,
            leaseUntil=now + int(leaseSeconds * 1000),
            lease=secrets.token_hex(8),
        )
        claimed = []
        for file in await self._files.filesWhere(partial(_anyDue, now=now)):
            claimed += await self._files.writer.submit(work, file)
        claimed.sort(key=lambda c: c.report.created_at)
        return claimed[:limit]

    def recordReportAttempt(
        self,
        claims: Iterable[tuple[str, str]],
        attempt: ReportAttempt | None,
        nextAttempt: datetime | None,
    ) -> Deferred[int]:
        claims = tuple(claims)
        work = partial(
            _recordAttempt,
            claims=claims,
            attempt=attempt,
            nextAttempt=None if nextAttempt is None else toMillis(nextAttempt),
        )
        return Deferred.fromCoroutine(self._recordReportAttempt(work, claims))

    async def _recordReportAttempt(
        self, work: Callable[[sqlite3.Connection], int], claims: tuple[tuple[str, str], ...]
    ) -> int:
        reportIds = tuple(reportId for reportId, _ in claims)
        written = 0
        for file in await self._files.filesWhere(partial(_holdsAny, reportIds=reportIds)):
            written += await self._files.writer.submit(work, file)
        return written

    def reportAttempts(self, notificationId: str) -> Deferred[list[ReportAttempt]]:
        if idNumber(notificationId) is None:
            return succeed([])
        d = self._files.reader.submitEach(partial(_attempts, number=int(notificationId)))
        return d.addCallback(
            lambda parts: sorted((a for _, part in parts for a in part), key=lambda a: a.at)
        )

    def pendingReports(self) -> Deferred[int]:
        return self._files.reader.submitEach(_count).addCallback(total)

    def markGone(self, url: str) -> Deferred[None]:
        work = partial(_markGone, url=url, now=self._files.now())
        return self._files.writer.submit(work, self._files.path)

    def isGone(self, url: str) -> Deferred[bool]:
        return self._files.reader.submit(partial(_isGone, url=url))


_COLUMNS = (
    "report_id, notification_id, account, url, content_type, kind, result, created_at, attempts"
)


def addReports(connection: sqlite3.Connection, reports: Sequence[PendingReport], now: int) -> None:
    """Put ``reports`` in the outbox, due at ``now`` (ms); one already there stays as it is."""
    insertRows(
        connection,
        "reports (report_id, notification_id, account, url, content_type, kind, result, "
        "created_at, next_attempt)",
        [
            (
                r.report_id,
                int(r.notification_id),
                r.account,
                r.url,
                r.content_type,
                r.kind,
                r.result,
                toMillis(r.created_at),
                now,
            )
            for r in reports
        ],
        orIgnore=True,
    )


def _claim(
    connection: sqlite3.Connection, limit: int, now: int, leaseUntil: int, lease: str
) -> list[ClaimedReport]:
    """Lease up to ``limit`` due reports of this file, oldest due first."""
    rows = connection.execute(
        f"SELECT {_COLUMNS} FROM reports WHERE next_attempt <= ? "  # noqa: S608
        "ORDER BY next_attempt LIMIT ?",
        (now, limit),
    ).fetchall()
    connection.executemany(
        "UPDATE reports SET lease = ?, next_attempt = ? WHERE report_id = ?",
        [(lease, leaseUntil, row[0]) for row in rows],
    )
    return [
        ClaimedReport(
            report=PendingReport(
                report_id=row[0],
                notification_id=str(row[1]),
                account=row[2],
                url=row[3],
                content_type=row[4],
                kind=row[5],
                result=row[6],
                created_at=fromMillis(row[7]),
            ),
            attempts=row[8],
            lease=lease,
        )
        for row in rows
    ]


def _anyDue(connection: sqlite3.Connection, now: int) -> bool:
    row = connection.execute("SELECT 1 FROM reports WHERE next_attempt <= ? LIMIT 1", (now,))
    return row.fetchone() is not None


def _holdsAny(connection: sqlite3.Connection, reportIds: tuple[str, ...]) -> bool:
    return any(
        connection.execute(
            withList("SELECT 1 FROM reports WHERE report_id IN (?*) LIMIT 1", chunk), chunk
        ).fetchone()
        for chunk in inChunks(reportIds)
    )


def _recordAttempt(
    connection: sqlite3.Connection,
    claims: tuple[tuple[str, str], ...],
    attempt: ReportAttempt | None,
    nextAttempt: int | None,
) -> int:
    """The write of :meth:`ReportOutbox.recordReportAttempt` for the claims whose report is
    in this file."""
    written = 0
    for reportId, lease in claims:
        row = connection.execute(
            "SELECT notification_id, lease FROM reports WHERE report_id = ?", (reportId,)
        ).fetchone()
        if row is None or row[1] != lease:
            continue
        written += 1
        if attempt is not None:
            connection.execute(
                "INSERT INTO report_attempts (notification_id, report_id, host, code, outcome, "
                "at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    row[0],
                    reportId,
                    attempt.host,
                    attempt.code,
                    attempt.outcome,
                    toMillis(attempt.at),
                ),
            )
        if nextAttempt is None and attempt is not None:
            connection.execute("DELETE FROM reports WHERE report_id = ?", (reportId,))
        else:
            connection.execute(
                "UPDATE reports SET lease = NULL, next_attempt = ?, "
                "attempts = attempts + ? WHERE report_id = ?",
                (nextAttempt if nextAttempt is not None else 0, int(attempt is not None), reportId),
            )
    return written


def _attempts(connection: sqlite3.Connection, number: int) -> list[ReportAttempt]:
    rows = connection.execute(
        "SELECT report_id, host, code, outcome, at FROM report_attempts "
        "WHERE notification_id = ? ORDER BY rowid",
        (number,),
    )
    return [
        ReportAttempt(str(number), row[0], row[1], row[2], row[3], fromMillis(row[4]))
        for row in rows
    ]


def _addEventsWithReports(
    connection: sqlite3.Connection,
    number: int,
    events: tuple[StatusEvent, ...],
    reports: tuple[PendingReport, ...],
    now: int,
) -> None:
    insertEvents(connection, events)
    addReports(connection, reports, now)


def _count(connection: sqlite3.Connection) -> int:
    return int(connection.execute("SELECT count(*) FROM reports").fetchone()[0])


def _markGone(connection: sqlite3.Connection, url: str, now: int) -> None:
    connection.execute("INSERT OR IGNORE INTO gone_urls (url, at) VALUES (?, ?)", (url, now))


def _isGone(connection: sqlite3.Connection, url: str) -> bool:
    row = connection.execute("SELECT 1 FROM gone_urls WHERE url = ?", (url,)).fetchone()
    return row is not None
