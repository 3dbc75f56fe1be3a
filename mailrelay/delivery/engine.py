"""
One delivery attempt, as a short list of named steps (SPEC §8.1, §8.2):

1. :meth:`DeliveryEngine.start` -- the first attempt of a notification writes ``CAAS_SENT``,
   in the claim's own write (the delivery loop hands it to ``claimDue``);
2. :meth:`~DeliveryEngine.prepare` -- the bytes that leave: DKIM-signed once, the same bytes on
   every retry;
3. :meth:`~DeliveryEngine.route` -- the pending recipients grouped by destination (the
   smarthost, or each recipient domain's MX hosts);
4. :meth:`~DeliveryEngine.send` -- one SMTP transaction per destination, all at once, each
   recipient coming back with its own outcome;
5. :meth:`~DeliveryEngine.bounce` -- a delivery status notification to the sender for the
   recipients that failed for good (queued like any other message, before the outcome is
   recorded, so a crash in between sends a second one rather than none);
6. :meth:`~DeliveryEngine.record` -- every outcome with its status event in one write: the
   finished recipients leave the queue, the others are deferred to their next attempt, or
   given up with ``CAAS_FAILED`` once the queue lifetime is over.

SMS recipients go to the ``[sms] gateway`` (:mod:`~mailrelay.delivery.sms`) in the same
attempt, beside the e-mail ones, and come back with outcomes of the same kind. Recipients of
a channel this relay does not send on -- SMS without a gateway, e-mail in hold mode (no
router) -- wait: a notification with nothing else left is held (``mailrelay queue release``
sends it on once the channel is configured).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay import maillog
from mailrelay.delivery import stats
from mailrelay.delivery.outcome import Kind, Outcome
from mailrelay.delivery.reports import reportsFor
from mailrelay.delivery.router import Route, Router
from mailrelay.delivery.schedule import RetrySchedule
from mailrelay.delivery.sms.gateway import SmsChannel
from mailrelay.delivery.smtp.client import Envelope, RecipientOutcome
from mailrelay.delivery.smtp.mx import RouteError
from mailrelay.delivery.smtp.pool import SMTPClientPool
from mailrelay.interfaces import IStore
from mailrelay.message.dkim import DkimSigner
from mailrelay.message.dsn import FailedRecipient, buildBounce, isDeliveryReport
from mailrelay.message.outbound import prepareForDelivery, senderDomain
from mailrelay.message.tracking import Tracker
from mailrelay.model import (
    Channel,
    Delivery,
    Notification,
    PendingReport,
    Recipient,
    StatusEvent,
    fromTimestamp,
)
from mailrelay.recent import RecentResult

log = Logger()

DKIM_DOMAINS_MAX_AGE = 5.0
"""Seconds the set of domains with a DKIM key is remembered between reads of the store."""

__all__ = ["DeliveryEngine", "Kind", "Outcome"]


class DeliveryEngine:
    """Runs the steps above for one claimed :class:`~mailrelay.model.Delivery` at a time
    (many at once: each call is independent)."""

    receiptsFollow: frozenset[Channel] = frozenset()
    """Channels whose ``CH_RECEIVED`` is not final: a receipt (``CH_SENT``) follows, and only
    that makes the final delivery report (:func:`~mailrelay.delivery.reports.reportsFor`)."""

    def __init__(
        self,
        store: IStore,
        router: Router | None,
        pool: SMTPClientPool | None,
        clock: IReactorTime,
        hostname: str,
        schedule: RetrySchedule,
        signer: DkimSigner | None = None,
        tracker: Tracker | None = None,
        sms: SmsChannel | None = None,
    ) -> None:
        self.tracker = tracker  # open and click tracking (SPEC §8.5); None: off
        self._sms = sms  # the [sms] gateway; None: SMS recipients are held
        if sms is not None and sms.receiptsFollow:
            self.receiptsFollow = self.receiptsFollow | {"sms"}
        self._store = store
        self._router = router
        self._pool = pool
        self._clock = clock
        self._hostname = hostname
        self._schedule = schedule
        self._signer = signer if signer is not None else DkimSigner()
        # The domains with a DKIM key, read at most every DKIM_DOMAINS_MAX_AGE seconds: a key
        # added with `mailrelay dkim generate` signs from then on.
        self._dkimDomains: RecentResult[frozenset[str]] = RecentResult(
            lambda: Deferred.fromCoroutine(self._readDkimDomains()), clock, DKIM_DOMAINS_MAX_AGE
        )

    def deliver(self, delivery: Delivery) -> Deferred[None]:
        """Try every pending recipient of ``delivery`` once and record the outcomes. Fails
        only when the store does (the lease then runs out and the delivery is due again)."""
        return Deferred.fromCoroutine(self._deliver(delivery))

    def _served(self, delivery: Delivery) -> tuple[list[Recipient], list[Recipient]]:
        """The pending e-mail and SMS recipients this engine sends to now: in hold mode (no
        router) e-mail recipients wait, as SMS ones do without a gateway."""
        email = [r for r in delivery.pending if r.channel == "email" and self._router is not None]
        sms = [r for r in delivery.pending if r.channel == "sms" and self._sms is not None]
        return email, sms

    async def _deliver(self, delivery: Delivery) -> None:
        email, sms = self._served(delivery)
        # The SMS channel beside the e-mail one, not after it; recorded with its outcomes.
        smsSent = self._sms.send(delivery, sms) if sms and self._sms is not None else None
        outcomes = await self.sendEmail(delivery, email) if email else []
        if smsSent is not None:
            outcomes = [*outcomes, *(await smsSent)]
        await self.bounce(delivery, outcomes)
        await self.record(delivery, outcomes)
        if smsSent is not None and self._sms is not None:
            self._sms.recorded(delivery.notification.notification_id)

    # -- the steps --

    def start(
        self, delivery: Delivery
    ) -> tuple[tuple[StatusEvent, ...], tuple[PendingReport, ...]]:
        """``CAAS_SENT`` for each recipient sent to now, and the reports it makes, when the
        notification's first attempt starts: the store writes them with the claim
        (:class:`~mailrelay.model.FirstAttempt`), not in a write of their own."""
        if delivery.attempts != 1:
            return (), ()
        email, sms = self._served(delivery)
        now = self._now()
        events = tuple(
            self._event(delivery, r, "CAAS_SENT", "Successful", now) for r in [*email, *sms]
        )
        return events, tuple(reportsFor(delivery.notification, events, self.receiptsFollow))

    async def sendEmail(self, delivery: Delivery, email: Sequence[Recipient]) -> list[Outcome]:
        """Steps 2 to 4 for the e-mail recipients. A message that cannot be prepared (a DKIM
        key that does not load, the store failing) defers them all: retried with backoff,
        and given up with a bounce at the end of the queue lifetime, never stuck."""
        try:
            if self.tracker is not None and self.tracker.wants(delivery.notification):
                return await self.sendTracked(delivery, email)
            message = await self.prepare(delivery)
        except Exception:
            log.failure("delivery {id}: cannot prepare the message", id=_id(delivery))
            reason = "local error preparing the message, will retry"
            return [Outcome(r, "deferred", reason, "4.3.0") for r in email]
        return await self.send(delivery, self.route(email), message)

    async def prepare(self, delivery: Delivery, recipient: Recipient | None = None) -> bytes:
        """The message as it leaves: without X-IB-* options, with Message-ID and Date, its
        HTML links tracked for ``recipient`` if given (SPEC §8.5), signed with the sender
        domain's DKIM key if it has one.
        The signature's time is the acceptance time, so every retry sends the same bytes."""
        notification = delivery.notification
        # The intake already did this; a message queued by other means (a bounce, another
        # producer on a shared Redis) gets the same treatment, and a second pass changes nothing.
        message = prepareForDelivery(
            delivery.message,
            hostname=self._hostname,
            notificationId=notification.notification_id,
            receivedAt=notification.received_at,
        )
        if recipient is not None and self.tracker is not None:
            message = self.tracker.rewrite(message, notification, recipient)
        signing = await self._dkimDomains.get()
        if not signing:
            return message  # no domain has a key: no need to read the From: field
        domain = senderDomain(message, notification.sender)
        if domain not in signing:
            return message
        key = await self._store.getDkimKey(domain)
        if key is None:
            return message
        return self._signer.sign(message, key, int(notification.received_at.timestamp()))

    async def sendTracked(
        self, delivery: Delivery, recipients: Sequence[Recipient]
    ) -> list[Outcome]:
        """Prepare, route and send for each recipient on its own: tracked links carry a
        token per recipient, so each gets its own bytes and its own transaction."""

        async def one(recipient: Recipient) -> list[Outcome]:
            message = await self.prepare(delivery, recipient)
            return await self.send(delivery, self.route([recipient]), message)

        sends = [Deferred.fromCoroutine(one(r)) for r in recipients]
        outcomes: list[Outcome] = []
        for (ok, value), recipient in zip(
            await DeferredList(sends, consumeErrors=True), recipients, strict=True
        ):
            if ok:
                outcomes += value
            else:
                assert isinstance(value, Failure)
                log.failure("tracked delivery of {id} failed", value, id=_id(delivery))
                outcomes.append(Outcome(recipient, "deferred", "local error, will retry", "4.3.0"))
        return outcomes

    def route(self, recipients: Sequence[Recipient]) -> dict[str, list[Recipient]]:
        """The recipients grouped by destination, in RCPT order within each."""
        assert self._router is not None  # e-mail is not sent in hold mode
        groups: dict[str, list[Recipient]] = defaultdict(list)
        for recipient in recipients:
            groups[self._router.destinationOf(recipient)].append(recipient)
        return groups

    async def send(
        self, delivery: Delivery, groups: dict[str, list[Recipient]], message: bytes
    ) -> list[Outcome]:
        """One transaction per destination, all destinations at once."""
        if len(groups) == 1:  # the common case, without a DeferredList to gather one send
            ((destination, recipients),) = groups.items()
            try:
                return await self._sendTo(delivery, destination, recipients, message)
            except Exception:
                return self._sendFailed(delivery, Failure(), recipients)
        sends = [
            Deferred.fromCoroutine(self._sendTo(delivery, destination, recipients, message))
            for destination, recipients in groups.items()
        ]
        results = await DeferredList(sends, consumeErrors=True)
        outcomes: list[Outcome] = []
        for (ok, value), recipients in zip(results, groups.values(), strict=True):
            if ok:
                outcomes += value
            else:
                assert isinstance(value, Failure)
                outcomes += self._sendFailed(delivery, value, recipients)
        return outcomes

    @staticmethod
    def _sendFailed(
        delivery: Delivery, failure: Failure, recipients: Sequence[Recipient]
    ) -> list[Outcome]:
        # A bug here must not lose the recipients: try them again later.
        log.failure("delivery of {id} failed", failure, id=_id(delivery))
        return [Outcome(r, "deferred", "local error, will retry", "4.3.0") for r in recipients]

    async def _sendTo(
        self, delivery: Delivery, destination: str, recipients: list[Recipient], message: bytes
    ) -> list[Outcome]:
        assert self._router is not None and self._pool is not None
        try:
            route: Route = await self._router.route(destination)
        except RouteError as e:
            kind: Kind = "failed" if e.permanent else "deferred"
            code = "5.1.2" if e.permanent else "4.4.3"
            return [Outcome(r, kind, e.reason, code) for r in recipients]
        envelope = Envelope(
            sender=delivery.notification.sender,
            recipients=tuple(r.address for r in recipients),
            message=message,
        )
        results: list[RecipientOutcome] = await self._pool.deliver(
            route.destination, route.candidates, route.tls, envelope, route.credentials
        )
        byAddress = {result.recipient: result for result in results}
        outcomes = []
        for recipient in recipients:
            result = byAddress.get(recipient.address)
            if result is None:  # the client answers for every recipient; if not, retry
                outcomes.append(Outcome(recipient, "deferred", "no answer recorded", "4.3.0"))
                continue
            outcomes.append(
                Outcome(
                    recipient,
                    result.kind,
                    result.reply,
                    result.dsnCode,
                    result.host,
                    final=route.final,
                )
            )
        return outcomes

    async def bounce(self, delivery: Delivery, outcomes: Sequence[Outcome]) -> None:
        """Queue a delivery status notification to the envelope sender for the recipients
        that failed for good in this attempt (or expired with it), unless the sender is
        null, the account turned bounces off, or the message is itself a report."""
        notification = delivery.notification
        now = self._clock.seconds()
        expired = self._expired(notification, now)
        failed = [o for o in outcomes if o.kind == "failed" or (o.kind == "deferred" and expired)]
        # Never to a null sender (a bounce itself), nor to an SMS sender id: no mailbox there.
        if not failed or "@" not in notification.sender:
            return
        account = await self._store.getAccount(notification.account)
        if account is None or not account.bounces or isDeliveryReport(delivery.message):
            return
        when = fromTimestamp(now)
        report = buildBounce(
            original=delivery.message,
            notification=notification,
            failed=[
                FailedRecipient(
                    recipient=o.recipient,
                    action="failed",
                    status=o.dsnCode if o.dsnCode[:1] == "5" else "4.4.7",
                    remoteMta=o.host or None,
                    diagnostic=o.reply,
                    lastAttempt=when,
                )
                for o in failed
            ],
            hostname=self._hostname,
            now=when,
            reason="expired" if expired and all(o.kind == "deferred" for o in failed) else "failed",
        )
        bounceId = self._store.nextNotificationId()
        await self._store.enqueue(
            Notification(
                notification_id=bounceId,
                account=notification.account,
                sender="",
                recipients=(Recipient(notification.sender, "email"),),
                size=len(report),
                received_at=when,
                client_address="",
                helo=self._hostname,
            ),
            report,
        )
        stats.bounces.inc()
        log.info(
            "bounce {bounce} queued for {id}: {count} recipient(s) failed",
            bounce=bounceId,
            id=notification.notification_id,
            count=len(failed),
        )

    async def record(self, delivery: Delivery, outcomes: Sequence[Outcome]) -> None:
        """Every outcome and its status event in one write, and what comes next."""
        notification = delivery.notification
        now = self._clock.seconds()
        when = fromTimestamp(now)
        expired = self._expired(notification, now)
        events: list[StatusEvent] = []
        finished: list[Recipient] = []
        for outcome in outcomes:
            recipient = outcome.recipient
            if outcome.kind == "delivered":
                events.append(self._event(delivery, recipient, "CH_RECEIVED", outcome.reply, when))
                if outcome.final:
                    events.append(self._event(delivery, recipient, "CH_SENT", outcome.reply, when))
                finished.append(recipient)
            elif outcome.kind == "failed":
                events.append(self._event(delivery, recipient, "CH_FAILED", outcome.reply, when))
                finished.append(recipient)
            elif expired:
                text = f"expired: {outcome.reply}"
                events.append(self._event(delivery, recipient, "CH_DEFERRED", outcome.reply, when))
                events.append(self._event(delivery, recipient, "CAAS_FAILED", text, when))
                finished.append(recipient)
            else:
                events.append(self._event(delivery, recipient, "CH_DEFERRED", outcome.reply, when))
            stats.countOutcome(
                "expired" if outcome.kind == "deferred" and expired else outcome.kind
            )
            maillog.delivery(
                notificationId=notification.notification_id,
                recipient=recipient.address,
                relay=outcome.host,
                status=outcome.kind,
                dsn=outcome.dsnCode,
                delay=now - notification.received_at.timestamp(),
                reply=outcome.reply,
            )
        left = [r for r in delivery.pending if r not in finished]
        nextAttempt = None
        if left:
            if not any(self._sends(r) for r in left):
                # No [sms] gateway, or hold mode for e-mail: aside until an operator releases.
                await self._store.hold(notification.notification_id, None)
                nextAttempt = when
            else:
                nextAttempt = fromTimestamp(
                    self._schedule.nextAttempt(
                        delivery.attempts, notification.received_at.timestamp(), now
                    )
                )
        await self._store.recordOutcome(
            notification.notification_id,
            delivery.lease,
            events,
            finished,
            nextAttempt,
            reports=reportsFor(notification, events, self.receiptsFollow),
        )

    # -- helpers --

    async def _readDkimDomains(self) -> frozenset[str]:
        return frozenset(key.domain for key in await self._store.listDkimKeys())

    def _sends(self, recipient: Recipient) -> bool:
        """Whether this relay sends on ``recipient``'s channel now."""
        channel = self._router if recipient.channel == "email" else self._sms
        return channel is not None

    def _expired(self, notification: Notification, now: float) -> bool:
        return self._schedule.expired(notification.received_at.timestamp(), now)

    def _now(self) -> datetime:
        return fromTimestamp(self._clock.seconds())

    @staticmethod
    def _event(
        delivery: Delivery, recipient: Recipient, code: str, text: str, when: datetime
    ) -> StatusEvent:
        return StatusEvent(delivery.notification.notification_id, recipient, code, text, when)


def _id(delivery: Delivery) -> str:
    return delivery.notification.notification_id
