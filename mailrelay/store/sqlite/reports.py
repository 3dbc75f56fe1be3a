"""
The report outbox's work on a database thread (:class:`~mailrelay.interfaces.IReportQueue`
of the SQLite store; tables in ``schema/010_reports.sql``). Each function runs inside the
transaction its caller's thread manages: :func:`addReports` inside the very write that
records the events the reports are about.
"""

from __future__ import annotations

import sqlite3

from mailrelay.model import ClaimedReport, PendingReport, ReportAttempt
from mailrelay.store.common import fromMillis, toMillis

_COLUMNS = (
    "report_id, notification_id, account, url, content_type, kind, result, created_at, attempts"
)


def addReports(
    connection: sqlite3.Connection, reports: tuple[PendingReport, ...], now: int
) -> None:
    """Put ``reports`` in the outbox, due at ``now`` (ms)."""
    connection.executemany(
        "INSERT OR IGNORE INTO reports (report_id, notification_id, account, url, content_type, "
        "kind, result, created_at, next_attempt) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
    )


def claimReports(
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


def recordReportAttempt(
    connection: sqlite3.Connection,
    claims: tuple[tuple[str, str], ...],
    attempt: ReportAttempt | None,
    nextAttempt: int | None,
) -> int:
    """The write of ``recordReportAttempt`` for the claims whose report is in this file."""
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


def reportAttempts(connection: sqlite3.Connection, number: int) -> list[ReportAttempt]:
    rows = connection.execute(
        "SELECT report_id, host, code, outcome, at FROM report_attempts "
        "WHERE notification_id = ? ORDER BY rowid",
        (number,),
    )
    return [
        ReportAttempt(str(number), row[0], row[1], row[2], row[3], fromMillis(row[4]))
        for row in rows
    ]
