"""How the Redis store writes the report outbox's values (keys in :mod:`.keys`)."""

from __future__ import annotations

import json
from typing import Any

from mailrelay.model import PendingReport, ReportAttempt
from mailrelay.store.common import fromMillis, toMillis

_COMPACT = (",", ":")


def reportJSON(report: PendingReport) -> str:
    return json.dumps(
        {
            "id": report.report_id,
            "n": report.notification_id,
            "account": report.account,
            "url": report.url,
            "type": report.content_type,
            "kind": report.kind,
            "result": report.result,
            "created": toMillis(report.created_at),
        },
        separators=_COMPACT,
    )


def reportFromJSON(data: bytes | str) -> PendingReport:
    fields: dict[str, Any] = json.loads(data)
    return PendingReport(
        report_id=fields["id"],
        notification_id=fields["n"],
        account=fields["account"],
        url=fields["url"],
        content_type=fields["type"],
        kind=fields["kind"],
        result=fields["result"],
        created_at=fromMillis(int(fields["created"])),
    )


def attemptJSON(attempt: ReportAttempt) -> str:
    return json.dumps(
        [attempt.report_id, attempt.host, attempt.code, attempt.outcome, toMillis(attempt.at)],
        separators=_COMPACT,
    )


def attemptFromJSON(notificationId: str, data: bytes | str) -> ReportAttempt:
    reportId, host, code, outcome, at = json.loads(data)
    return ReportAttempt(notificationId, reportId, host, int(code), outcome, fromMillis(int(at)))
