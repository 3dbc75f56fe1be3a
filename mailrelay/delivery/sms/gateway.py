"""
The SMS channel as the delivery engine sees it, and the one small interface both gateways
(SMPP, HTTP) implement.

A gateway takes one :class:`SmsMessage` (one text to one number) and answers with a
:class:`Submission`: accepted (with the gateway's message ids, one per short message), refused
for now, or refused for good. :class:`SmsChannel` turns those into the engine's per-recipient
:class:`~mailrelay.delivery.outcome.Outcome` values and keeps the message ids that wait for a
delivery receipt (:mod:`~mailrelay.delivery.sms.receipts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.delivery.outcome import Kind, Outcome
from mailrelay.delivery.sms.receipts import ReceiptBook
from mailrelay.model import Delivery, Recipient
from mailrelay.policy.content import smsTextOf

log = Logger()


@dataclass(frozen=True)
class SmsMessage:
    """One text to one number. ``sender`` is the sender id or number MAIL FROM gave;
    ``reference`` tells this text's concatenated parts apart from others (0-255)."""

    notificationId: str
    recipient: Recipient
    sender: str
    text: str
    reference: int = 0


@dataclass(frozen=True)
class Submission:
    """A gateway's answer to one :class:`SmsMessage`. ``kind`` "delivered" means the gateway
    accepted it (``CH_RECEIVED``); ``messageIds`` are the ids its receipts will name;
    ``awaitsReceipt`` says whether a receipt will follow at all."""

    kind: Kind
    reply: str
    messageIds: tuple[str, ...] = ()
    awaitsReceipt: bool = True


class SmsGateway(Protocol):
    """What both gateways do."""

    label: str
    """The gateway's host, for the trail (``smsc.example:2775``)."""

    def submit(self, message: SmsMessage) -> Deferred[Submission]:
        """Hand ``message`` to the gateway. Never fails: a broken connection, a timeout or a
        bug is a ``deferred`` Submission."""


class SmsChannel:
    """The SMS recipients of a delivery, to the gateway: one text each, all at once."""

    def __init__(
        self, gateway: SmsGateway, receipts: ReceiptBook, receiptsFollow: bool = True
    ) -> None:
        self.gateway = gateway
        self.receipts = receipts
        self.receiptsFollow = receiptsFollow
        """Whether the gateway sends receipts (``CH_SENT`` follows ``CH_RECEIVED``)."""

    def send(self, delivery: Delivery, recipients: Sequence[Recipient]) -> Deferred[list[Outcome]]:
        """An Outcome for each of ``recipients``, in order."""
        return Deferred.fromCoroutine(self._send(delivery, recipients))

    async def _send(self, delivery: Delivery, recipients: Sequence[Recipient]) -> list[Outcome]:
        notification = delivery.notification
        try:
            text = smsTextOf(delivery.message)
        except ValueError as e:
            # Accepted messages always have a text; one queued by other means may not.
            return [Outcome(r, "failed", f"no SMS text: {e}", "5.6.0") for r in recipients]
        reference = int(notification.notification_id) & 0xFF
        messages = [
            SmsMessage(notification.notification_id, r, notification.sender, text, reference)
            for r in recipients
        ]
        results = await DeferredList([self.gateway.submit(m) for m in messages], consumeErrors=True)
        outcomes = []
        expected = []
        for message, (ok, value) in zip(messages, results, strict=True):
            if not ok:
                assert isinstance(value, Failure)
                log.failure("sms submit for {id} failed", value, id=message.notificationId)
                value = Submission("deferred", "local error, will retry")
            submission: Submission = value
            code = {"delivered": "2.0.0", "deferred": "4.4.1", "failed": "5.0.0"}[submission.kind]
            if submission.kind == "delivered" and submission.awaitsReceipt:
                expected.append(
                    self.receipts.expect(
                        submission.messageIds, message.notificationId, message.recipient
                    )
                )
            outcomes.append(
                Outcome(
                    message.recipient, submission.kind, submission.reply, code, self.gateway.label
                )
            )
        # The ids are in the store before the outcomes are recorded: a receipt that comes
        # after CH_RECEIVED is written finds its text, whichever relay it reaches.
        await DeferredList(expected)
        return outcomes

    def recorded(self, notificationId: str) -> None:
        """The engine has written this notification's outcomes: receipts for it may now be
        written after them (one that came first was kept until now)."""
        self.receipts.release(notificationId)
