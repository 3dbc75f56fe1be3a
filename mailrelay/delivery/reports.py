"""
Delivery and tracking reports: callbacks to the URLs customers name (SPEC §8.4, §8.5).

- :func:`reportsFor` -- which status events make a report, and the report of each (an entry of
  an Infobip-shaped ``results`` list), for the outbox. The delivery engine calls it in its
  record step and writes the reports in the same store write as the events
  (``IDeliveryQueue.recordOutcome``); outside a delivery (SMS receipts, opens and clicks) the
  same reports go with their events through ``IReportQueue.addEventsWithReports``;
- :func:`renderDocument` -- a batch of results as the JSON or XML document POSTed;
- :func:`signatureHeaders` -- Standard Webhooks signing with the account's secrets;
- :class:`ReportDispatcher` -- a Twisted service of the relay's main process: claims due reports
  from the outbox, POSTs them in batches per URL through the SSRF-safe agent, and records each
  answer: done, retried on :data:`RETRY_DELAYS`, or dropped.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit
from xml.etree import ElementTree

import treq
from prometheus_client import Counter, Gauge
from standardwebhooks.webhooks import Webhook
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredSemaphore,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgent

from mailrelay.interfaces import IStore
from mailrelay.metrics import REGISTRY
from mailrelay.model import (
    Channel,
    ClaimedReport,
    Notification,
    PendingReport,
    ReportAttempt,
    StatusEvent,
    fromTimestamp,
)

log = Logger()

RETRY_DELAYS: tuple[int, ...] = (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
"""Seconds before each retry of a report that was not acknowledged (SPEC §8.4: 5 s, 5 min,
30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h); after the last one it is dropped and counted."""

MAX_BATCH = 100
"""Reports to one URL that share one POST at most."""
TIMEOUT = 15.0
"""Seconds a POST may take, answer included."""
MAX_ANSWER = 64 * 1024
"""Octets of an answer's body read at most; the rest is not waited for."""

JSON = "application/json"
XML = "application/xml"

reportsCounted = Counter(
    "mailrelay_reports",
    "Report POSTs by outcome: sent (2xx), retry (no 2xx yet), dropped (retries exhausted), "
    "gone (410 from the URL), refused (no allowed address)",
    ["outcome"],
    registry=REGISTRY,
)
reportsPending = Gauge(
    "mailrelay_reports_pending", "Reports in the outbox waiting to be sent", registry=REGISTRY
)


# -- which events make a report --


@dataclass(frozen=True)
class _Status:
    groupId: int
    groupName: str
    id: int
    name: str
    description: str


PENDING = _Status(1, "PENDING", 7, "PENDING_ENROUTE", "Message sent to next instance")
UNDELIVERABLE = _Status(
    2, "UNDELIVERABLE", 9, "UNDELIVERABLE_NOT_DELIVERED", "Message sent not delivered"
)
DELIVERED = _Status(3, "DELIVERED", 5, "DELIVERED_TO_HANDSET", "Message delivered to handset")
EXPIRED = _Status(4, "EXPIRED", 15, "EXPIRED_EXPIRED", "Message expired")
REJECTED = _Status(5, "REJECTED", 6, "REJECTED_NETWORK", "Message rejected before sending")

_NO_ERROR = {
    "groupId": 0,
    "groupName": "OK",
    "id": 0,
    "name": "NO_ERROR",
    "description": "No Error",
    "permanent": False,
}


def _statusOf(event: StatusEvent, final: bool) -> tuple[_Status, bool] | None:
    """The report status of ``event`` and whether it is final; None: no report."""
    code = event.status_code
    if code == "CH_SENT" or (code == "CH_RECEIVED" and final):
        return DELIVERED, True
    if code == "CH_FAILED":
        return UNDELIVERABLE, True
    if code == "CAAS_FAILED":
        expired = event.status_text.startswith("expired")
        return (EXPIRED if expired else REJECTED), True
    if code in ("CAAS_SENT", "CH_RECEIVED", "CH_DEFERRED"):
        return PENDING, False
    return None


def formatTime(when: datetime) -> str:
    """``yyyy-MM-ddTHH:mm:ss.SSS+0000`` (UTC), the reports' time format."""
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}+0000"


def newReportId() -> str:
    """A fresh report id, which is also the ``webhook-id`` of a report POSTed alone."""
    return f"msg_{secrets.token_hex(16)}"


def reportsFor(
    notification: Notification,
    events: Iterable[StatusEvent],
    receiptsFollow: frozenset[Channel] = frozenset(),
) -> list[PendingReport]:
    """
    The delivery reports ``events`` (of ``notification``) make, for the outbox; none when the
    message named no ``X-IB-notify-url``. Final states always (``CH_SENT``; ``CH_RECEIVED`` on
    a channel not in ``receiptsFollow``, since nothing later comes there; ``CH_FAILED``;
    ``CAAS_FAILED``), the others only with ``X-IB-intermediate-report: true``. A
    ``CH_RECEIVED`` followed by ``CH_SENT`` for the same recipient in ``events`` makes no
    report of its own. Pure: the caller writes the reports with the events.
    """
    options = notification.options
    if not options.notify_url:
        return []
    events = list(events)
    sent = {e.recipient for e in events if e.status_code == "CH_SENT"}
    reports = []
    for event in events:
        if event.status_code == "CH_RECEIVED" and event.recipient in sent:
            continue
        final = event.recipient.channel not in receiptsFollow
        found = _statusOf(event, final)
        if found is None:
            continue
        status, isFinal = found
        if not isFinal and not options.intermediate_report:
            continue
        result = deliveryResult(notification, event, status)
        reports.append(
            PendingReport(
                report_id=newReportId(),
                notification_id=notification.notification_id,
                account=notification.account,
                url=options.notify_url,
                content_type=XML if options.notify_content_type == XML else JSON,
                kind="delivery",
                result=json.dumps(result, separators=(",", ":")),
                created_at=event.timestamp,
            )
        )
    return reports


def deliveryResult(
    notification: Notification, event: StatusEvent, status: _Status
) -> dict[str, Any]:
    """One entry of a delivery report's ``results``, in the shape of Infobip's."""
    options = notification.options
    result: dict[str, Any] = {}
    if options.bulk_id:
        result["bulkId"] = options.bulk_id
    result |= {
        "messageId": notification.notification_id,
        "to": event.recipient.address,
        "sentAt": formatTime(notification.received_at),
        "doneAt": formatTime(event.timestamp),
        "channel": event.recipient.channel.upper(),
        "status": {
            "groupId": status.groupId,
            "groupName": status.groupName,
            "id": status.id,
            "name": status.name,
            "description": status.description,
        },
    }
    if status in (UNDELIVERABLE, EXPIRED, REJECTED):
        result["error"] = {
            "groupId": 1,
            "groupName": "DELIVERY_ERRORS" if status is UNDELIVERABLE else "RELAY_ERRORS",
            "id": status.id,
            "name": status.name,
            "description": event.status_text,
            "permanent": True,
        }
    else:
        result["error"] = dict(_NO_ERROR)
    if options.callback_data is not None:
        result["callbackData"] = options.callback_data
    return result


def trackingReports(notification: Notification, event: StatusEvent) -> list[PendingReport]:
    """The report of an ``OPENED`` or ``CLICKED`` event to the message's
    ``X-IB-tracking-url`` (none without one), for the outbox."""
    options = notification.options
    if not options.tracking_url:
        return []
    result: dict[str, Any] = {"notificationType": event.status_code}
    if options.bulk_id:
        result["bulkId"] = options.bulk_id
    result |= {
        "messageId": notification.notification_id,
        "to": event.recipient.address,
        "channel": event.recipient.channel.upper(),
        "sendDateTime": formatTime(event.timestamp),
    }
    if event.status_code == "CLICKED":
        result["url"] = event.status_text
    if options.callback_data is not None:
        result["callbackData"] = options.callback_data
    return [
        PendingReport(
            report_id=newReportId(),
            notification_id=notification.notification_id,
            account=notification.account,
            url=options.tracking_url,
            content_type=JSON,
            kind="tracking",
            result=json.dumps(result, separators=(",", ":")),
            created_at=event.timestamp,
        )
    ]


# -- the documents --


def renderDocument(results: Sequence[dict[str, Any]], contentType: str) -> bytes:
    """``{"results": [...]}`` as JSON, or with ``application/xml`` the same document as
    ``<reportResponse><results><result>…</result></results></reportResponse>``."""
    if contentType != XML:
        return json.dumps({"results": list(results)}, separators=(",", ":")).encode()
    root = ElementTree.Element("reportResponse")
    listing = ElementTree.SubElement(root, "results")
    for result in results:
        _xmlFields(ElementTree.SubElement(listing, "result"), result)
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)


def _xmlFields(parent: ElementTree.Element, fields: dict[str, Any]) -> None:
    for name, value in fields.items():
        child = ElementTree.SubElement(parent, name)
        if isinstance(value, dict):
            _xmlFields(child, value)
        elif isinstance(value, bool):
            child.text = "true" if value else "false"
        else:
            child.text = str(value)


# -- signing --


def newWebhookSecret() -> str:
    """A fresh Standard Webhooks secret, ``whsec_<base64 of 32 random octets>``."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def signatureHeaders(
    webhookId: str, timestamp: int, body: bytes, secretList: Sequence[str]
) -> dict[bytes | str, bytes | str]:
    """The Standard Webhooks headers of a POST: ``webhook-id``, ``webhook-timestamp`` and
    ``webhook-signature`` with one ``v1,<base64>`` per secret (two during a rotation)."""
    when = fromTimestamp(timestamp)
    signatures = [Webhook(secret).sign(webhookId, when, body) for secret in secretList]
    return {
        "webhook-id": webhookId,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signatures),
    }


def batchId(reports: Sequence[PendingReport]) -> str:
    """The ``webhook-id`` of a POST: the report's own id when alone, else one derived from
    the ids of the batch, so that the same batch retried keeps its id."""
    if len(reports) == 1:
        return reports[0].report_id
    digest = hashlib.sha256(",".join(sorted(r.report_id for r in reports)).encode())
    return f"msg_{digest.hexdigest()[:32]}"


def retryAt(attemptsBefore: int, now: float) -> datetime | None:
    """When a report that failed its attempt number ``attemptsBefore + 1`` is tried again;
    None once :data:`RETRY_DELAYS` are used up (then it is dropped)."""
    if attemptsBefore >= len(RETRY_DELAYS):
        return None
    return fromTimestamp(now) + timedelta(seconds=RETRY_DELAYS[attemptsBefore])


# -- the dispatcher --


_DONE = Failure(ResponseDone())


class _BoundedBody(Protocol):
    """Reads at most ``limit`` octets of an answer, then stops the transfer."""

    def __init__(self, limit: int, done: Deferred[int]) -> None:
        self._limit = limit
        self._done = done
        self._read = 0

    def dataReceived(self, data: bytes) -> None:
        self._read += len(data)
        if self._read >= self._limit and self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if not self._done.called:
            self._done.callback(min(self._read, self._limit))


@dataclass(frozen=True)
class DispatchSettings:
    pollInterval: float = 1.0  # a report waits at most this long: the batching window
    leaseSeconds: float = 300.0
    claimLimit: int = 1000
    perHost: int = 4  # POSTs at once to one URL host
    maxInFlight: int = 200  # POSTs at once in all
    timeout: float = TIMEOUT
    maxAnswer: int = MAX_ANSWER
    stopDeadline: float = 5.0


class ReportDispatcher(Service):
    """Sends what the outbox holds; see the module's docstring."""

    name = "reports"

    def __init__(
        self,
        store: IStore,
        agent: IAgent | None,
        clock: IReactorTime,
        settings: DispatchSettings = DispatchSettings(),
        whenReady: Any = None,
        onStop: Any = None,
        makeAgent: Any = None,
    ) -> None:
        # makeAgent() -> (agent, onStop): the agent made at start (a system resolver
        # schedules re-reads of resolv.conf from the moment it exists).
        self._makeAgent = makeAgent
        self._onStop = onStop
        self._store = store
        self._agent = agent
        self._clock = clock
        self._settings = settings
        self._whenReady = whenReady
        self._next: IDelayedCall | None = None
        self._hosts: dict[str, DeferredSemaphore] = {}
        self._sending: dict[Deferred[None], list[ClaimedReport]] = {}
        self._started: set[int] = set()  # id() of the batches whose POST has begun
        self._stopping = False
        self._polls = 0

    def startService(self) -> None:
        super().startService()
        if self._makeAgent is not None:
            self._agent, self._onStop = self._makeAgent()
        if self._whenReady is None:
            self._schedule(0)
        else:
            self._whenReady().addCallback(self._ready)

    def _ready(self, _: object) -> None:
        if self.running:
            self._schedule(0)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        if self._onStop is not None:
            self._onStop()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if not self._sending:
            return
        finished: Deferred[Any] = DeferredList(list(self._sending), consumeErrors=True)
        self._stopping = True
        deadline: Deferred[Any] = deferLater(self._clock, self._settings.stopDeadline, lambda: None)
        await DeferredList([finished, deadline], fireOnOneCallback=True, consumeErrors=True)
        deadline.cancel()
        waiting = [b for b in self._sending.values() if id(b) not in self._started]
        running = list(self._sending)
        for sending in running:
            sending.cancel()  # a POST under way gives its claims back itself (see _send)
        await DeferredList(running, consumeErrors=True)
        for batch in waiting:
            await self._giveBack(batch)

    async def _giveBack(self, batch: list[ClaimedReport]) -> None:
        """Due again at once, this attempt not counted (the relay is stopping)."""
        try:
            await self._store.recordReportAttempt(
                [(c.report.report_id, c.lease) for c in batch], None, None
            )
        except Exception as e:  # the lease runs out instead
            log.warn("reports: claims not given back: {error}", error=str(e))

    def _schedule(self, delay: float) -> None:
        self._next = self._clock.callLater(delay, self._poll)

    def _poll(self) -> None:
        self._next = None
        if not self.running:
            return
        d = Deferred.fromCoroutine(self._claim())
        d.addErrback(lambda f: log.failure("reports: poll failed", f))
        d.addBoth(self._polled)

    def _polled(self, _: object) -> None:
        if self.running:
            self._schedule(self._settings.pollInterval)

    async def _claim(self) -> None:
        self._polls += 1
        room = self._settings.maxInFlight - len(self._sending)
        if room <= 0:
            return
        try:
            claims = await self._store.claimReports(
                min(self._settings.claimLimit, room * MAX_BATCH), self._settings.leaseSeconds
            )
            if claims or self._polls % 10 == 1:
                reportsPending.set(await self._store.pendingReports())
        except Exception as e:
            log.warn("reports: cannot read the outbox: {error}", error=str(e))
            return
        for batch in batches(claims):
            self._start(batch)

    def _start(self, batch: list[ClaimedReport]) -> None:
        host = urlsplit(batch[0].report.url).hostname or ""
        semaphore = self._hosts.get(host)
        if semaphore is None:
            semaphore = self._hosts[host] = DeferredSemaphore(self._settings.perHost)

        def send(_: object) -> Deferred[None]:
            self._started.add(id(batch))
            return Deferred.fromCoroutine(self._send(batch))

        d: Deferred[None] = semaphore.acquire().addCallback(send)
        self._sending[d] = batch

        def done(result: Any) -> None:
            self._sending.pop(d, None)
            if id(batch) in self._started:
                self._started.discard(id(batch))
                semaphore.release()
            if semaphore.tokens == semaphore.limit and not semaphore.waiting:
                self._hosts.pop(host, None)
            if isinstance(result, Failure) and not result.check(CancelledError):
                log.failure("reports: sending a batch failed", result)

        d.addBoth(done)

    async def _send(self, batch: list[ClaimedReport]) -> None:
        reports = [claim.report for claim in batch]
        first = reports[0]
        url = first.url
        host = urlsplit(url).hostname or ""
        try:
            if await self._store.isGone(url):
                await self._record(batch, host, 0, "gone")
                return
            secretList = await self._secretsOf(first.account)
            body = renderDocument([json.loads(r.result) for r in reports], first.content_type)
            headers: dict[bytes | str, bytes | str] = {
                "Content-Type": first.content_type,
                "User-Agent": "mailrelay",
                **signatureHeaders(batchId(reports), int(self._clock.seconds()), body, secretList),
            }
            code = await self._post(url, body, headers)
        except Exception as e:
            if self._stopping:
                await self._giveBack(batch)
                return
            # No answer: refused by the address policy, DNS, connection, timeout.
            refused = "DNS lookup failed" in str(e) or "no allowed address" in str(e)
            log.info("reports: POST to {host} failed: {error}", host=host, error=str(e) or repr(e))
            await self._record(batch, host, 0, "refused" if refused else "retry")
            return
        if 200 <= code < 300:
            await self._record(batch, host, code, "sent")
        elif code == 410:
            await self._store.markGone(url)
            log.info("reports: {host} answered 410 Gone: no more reports to that URL", host=host)
            await self._record(batch, host, code, "gone")
        else:
            log.info("reports: {host} answered {code}", host=host, code=code)
            await self._record(batch, host, code, "retry")

    async def _secretsOf(self, account: str) -> tuple[str, ...]:
        secretList = await self._store.webhookSecrets(account)
        if not secretList:
            # The first report of an account makes its secret; the operator shows it with
            # ``mailrelay account webhook-secret NAME``.
            secretList = (newWebhookSecret(),)
            await self._store.setWebhookSecrets(account, secretList)
        return tuple(secretList)

    async def _post(self, url: str, body: bytes, headers: dict[bytes | str, bytes | str]) -> int:
        assert self._agent is not None
        request = treq.post(
            url,
            data=body,
            headers=headers,
            agent=self._agent,
            allow_redirects=False,
            reactor=self._clock,  # type: ignore[arg-type]
        )
        # addTimeout, not treq's timeout: its expiry is a TimeoutError, a retry, where a
        # cancellation is the relay stopping.
        request.addTimeout(self._settings.timeout, self._clock)
        response = await request
        read: Deferred[int] = Deferred()
        response.deliverBody(_BoundedBody(self._settings.maxAnswer, read))
        read.addTimeout(self._settings.timeout, self._clock)
        try:
            await read
        except (PotentialDataLoss, CancelledError, TimeoutError):
            pass
        return int(response.code)

    async def _record(self, batch: list[ClaimedReport], host: str, code: int, outcome: str) -> None:
        """Write the attempt of every report of ``batch``: done (sent, gone), or retried on
        the schedule, or dropped once it is used up."""
        now = self._clock.seconds()
        when = fromTimestamp(now)
        byAttempts: dict[int, list[ClaimedReport]] = {}
        for claim in batch:
            byAttempts.setdefault(claim.attempts, []).append(claim)
        for attemptsBefore, claims in byAttempts.items():
            final = outcome
            nextAttempt = None
            if outcome in ("retry", "refused"):
                nextAttempt = retryAt(attemptsBefore, now)
                if nextAttempt is None:
                    final = "dropped"
                    log.warn(
                        "reports: {count} report(s) to {host} dropped after {n} attempts",
                        count=len(claims),
                        host=host,
                        n=attemptsBefore + 1,
                    )
            reportsCounted.labels(final).inc(len(claims))
            attempt = ReportAttempt("", "", host, code, final, when)
            await self._store.recordReportAttempt(
                [(c.report.report_id, c.lease) for c in claims], attempt, nextAttempt
            )


def batches(claims: Iterable[ClaimedReport]) -> list[list[ClaimedReport]]:
    """``claims`` grouped by account, URL and document type, at most :data:`MAX_BATCH` a
    group, in the order they came."""
    groups: dict[tuple[str, str, str], list[list[ClaimedReport]]] = {}
    for claim in claims:
        report = claim.report
        chunks = groups.setdefault((report.account, report.url, report.content_type), [[]])
        if len(chunks[-1]) == MAX_BATCH:
            chunks.append([])
        chunks[-1].append(claim)
    return [chunk for chunks in groups.values() for chunk in chunks]
