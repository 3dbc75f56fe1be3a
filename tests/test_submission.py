"""
Tests for mailrelay.submission: the account's rules, end to end through the SMTP protocol,
the avatar and the real SQLite store. Every refusal checks the exact reply and that nothing
was left in the queue.
"""

from __future__ import annotations

import dataclasses
import re
from email.message import EmailMessage
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from mailrelay.model import Recipient, Sender
from mailrelay.smtp import replies
from mailrelay.smtp.replies import Reply
from tests.smtp_fixture import ACCOUNT, SENDER_DOMAIN, ProtocolHarness
from tests.test_smtp_protocol import assertReply

_ACCEPTED = re.compile(r"^250 2\.0\.0 OK id=(\d+)$")
FROM = f"app@{SENDER_DOMAIN}"


def wire(message: bytes) -> bytes:
    """A message as DATA carries it: CRLF lines, dot-stuffed, with the end marker."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"\r\n".join(stuffed) + b"\r\n.\r\n"


def simpleMessage(body: str = "Hello\n", **headers: str) -> bytes:
    message = EmailMessage()
    message["From"] = headers.pop("From", FROM)
    message["To"] = headers.pop("To", "someone@example.org")
    message["Subject"] = "test"
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    message.set_content(body)
    return message.as_bytes()


class SubmissionTestCase(TestCase):
    accountSettings: dict[str, Any] = {}

    @inlineCallbacks
    def setUp(self) -> Any:
        self.harness = ProtocolHarness(self, {"max_message_size": 100_000})
        yield self.harness.start()
        store = self.harness.store
        account = yield store.getAccount(ACCOUNT)
        if self.accountSettings:
            yield store.updateAccount(dataclasses.replace(account, **self.accountSettings))
        self.session = self.harness.connect()
        yield self.session.login()

    def assertReply(self, line: str, reply: Reply) -> None:
        assertReply(self, line, reply)

    @inlineCallbacks
    def relogin(self, **settings: Any) -> Any:
        """Change the account's settings and start a new, logged-in session."""
        account = yield self.harness.store.getAccount(ACCOUNT)
        yield self.harness.store.updateAccount(dataclasses.replace(account, **settings))
        self.session = self.harness.connect()
        yield self.session.login()

    @inlineCallbacks
    def submit(self, sender: str, recipients: list[str], message: bytes) -> Any:
        """Run one transaction; returns (the final reply line, the replies to each RCPT)."""
        reply = yield self.session.command(f"MAIL FROM:{sender}")
        if not reply.startswith("250 "):
            return reply, []
        rcptReplies = []
        for recipient in recipients:
            rcptReplies.append((yield self.session.command(f"RCPT TO:{recipient}")))
        reply = yield self.session.command("DATA")
        if not reply.startswith("354 "):
            return reply, rcptReplies
        lines = yield self.session.send(wire(message))
        return lines[-1], rcptReplies

    @inlineCallbacks
    def assertNothingQueued(self) -> Any:
        stats = yield self.harness.store.stats()
        self.assertEqual(stats.queued, 0)

    @inlineCallbacks
    def stored(self, reply: str) -> Any:
        """The notification and stored message bytes an accepting reply names."""
        match = _ACCEPTED.match(reply)
        self.assertIsNotNone(match, reply)
        assert match is not None
        notification = yield self.harness.store.getNotification(match.group(1))
        entries = yield self.harness.store.claimDue(100, 60)
        [entry] = [e for e in entries if e.notification.notification_id == match.group(1)]
        return notification, entry.message


class SMSTests(SubmissionTestCase):
    accountSettings = {"sms_enabled": True}

    @inlineCallbacks
    def setUp(self) -> Any:
        yield super().setUp()
        yield self.harness.store.addSender(Sender(ACCOUNT, "+393331234567", "sms"))

    @inlineCallbacks
    def test_gatewayStyleSubmission(self) -> Any:
        """As the public SMS-over-SMTP gateways document it: bare numbers, short plain text."""
        reply, rcpts = yield self.submit(
            "+393331234567", ["+4477331234567"], b"Subject: hi\r\n\r\nYour code is 1234\r\n"
        )
        self.assertReply(rcpts[0], replies.RECIPIENT_OK)
        notification, _ = yield self.stored(reply)
        self.assertEqual(notification.sender, "+393331234567")
        self.assertEqual(notification.recipients, (Recipient("+4477331234567", "sms"),))
        trail = yield self.harness.store.statusTrail(notification.notification_id)
        self.assertEqual(
            [(e.status_code, e.recipient.key) for e in trail],
            [("CAAS_RECEIVED", "sms:+4477331234567")],
        )

    @inlineCallbacks
    def test_phoneFormsNormalised(self) -> Any:
        reply, _ = yield self.submit(
            "+393331234567",
            ["<004477331234567>", "4477331234568"],
            b"Subject: hi\r\n\r\nhello\r\n",
        )
        notification, _ = yield self.stored(reply)
        self.assertEqual(
            [r.address for r in notification.recipients], ["+4477331234567", "+4477331234568"]
        )

    @inlineCallbacks
    def test_160GSMCharactersAccepted(self) -> Any:
        reply, _ = yield self.submit(
            "+393331234567", ["+4477331234567"], b"Subject: x\r\n\r\n" + b"a" * 160 + b"\r\n"
        )
        self.assertIsNotNone(_ACCEPTED.match(reply), reply)

    @inlineCallbacks
    def test_161GSMCharactersRefused(self) -> Any:
        reply, _ = yield self.submit(
            "+393331234567", ["+4477331234567"], b"Subject: x\r\n\r\n" + b"a" * 161 + b"\r\n"
        )
        self.assertReply(reply, replies.CONTENT_REFUSED)
        self.assertEqual(reply[:10], "550 5.6.0 ")
        yield self.assertNothingQueued()

    @inlineCallbacks
    def test_unregisteredSenderId(self) -> Any:
        reply = yield self.session.command("MAIL FROM:+391111111111")
        self.assertReply(reply, replies.SENDER_NOT_ALLOWED)


class NoSMSTests(SubmissionTestCase):
    @inlineCallbacks
    def test_phoneRecipientWithoutSMS(self) -> Any:
        yield self.session.command(f"MAIL FROM:<{FROM}>")
        reply = yield self.session.command("RCPT TO:<+4477331234567>")
        self.assertEqual(reply[:10], "550 5.1.1 ")
        self.assertReply(reply, replies.NO_SUCH_RECIPIENT)


class SenderTests(SubmissionTestCase):
    @inlineCallbacks
    def test_registeredAddressSender(self) -> Any:
        yield self.harness.store.addSender(Sender(ACCOUNT, "boss@other.example", "address"))
        session = self.harness.connect()  # senders are read once per session
        yield session.login()
        reply = yield session.command("MAIL FROM:<boss@other.example>")
        self.assertReply(reply, replies.SENDER_OK)
        yield session.command("RSET")
        # Registering an address registers that address, not its domain.
        reply = yield session.command("MAIL FROM:<someone@other.example>")
        self.assertReply(reply, replies.SENDER_NOT_ALLOWED)

    @inlineCallbacks
    def test_subdomainIsNotTheDomain(self) -> Any:
        reply = yield self.session.command(f"MAIL FROM:<app@mail.{SENDER_DOMAIN}>")
        self.assertReply(reply, replies.SENDER_NOT_ALLOWED)

    @inlineCallbacks
    def test_fromHeaderMustBeRegistered(self) -> Any:
        reply, _ = yield self.submit(
            f"<{FROM}>", ["<a@example.org>"], simpleMessage(From="ceo@elsewhere.example")
        )
        self.assertEqual(reply[:10], "553 5.7.1 ")
        yield self.assertNothingQueued()


class ContentTests(SubmissionTestCase):
    @inlineCallbacks
    def test_headerOptionsStoredAndRemoved(self) -> Any:
        message = simpleMessage(
            X_IB_bulk_id="bulk-42",
            X_IB_notify_url="https://hooks.acme.example/dlr",
            X_IB_notify_content_type="application/xml",
            X_IB_callback_data="order=7",
            X_IB_intermediate_report="true",
        )
        reply, _ = yield self.submit(f"<{FROM}>", ["<a@example.org>"], message)
        notification, stored = yield self.stored(reply)
        options = notification.options
        self.assertEqual(options.bulk_id, "bulk-42")
        self.assertEqual(options.notify_url, "https://hooks.acme.example/dlr")
        self.assertEqual(options.notify_content_type, "application/xml")
        self.assertEqual(options.callback_data, "order=7")
        self.assertTrue(options.intermediate_report)
        self.assertNotIn(b"X-IB-", stored)
        self.assertNotIn(b"x-ib-", stored.lower())
        bulk = yield self.harness.store.notificationsForBulk(ACCOUNT, "bulk-42")
        self.assertEqual(bulk, [notification.notification_id])

    @inlineCallbacks
    def test_malformedOptionRefused(self) -> Any:
        message = simpleMessage(X_IB_notify_url="javascript:alert(1)")
        reply, _ = yield self.submit(f"<{FROM}>", ["<a@example.org>"], message)
        self.assertEqual(reply[:10], "550 5.6.0 ")
        self.assertIn("X-IB-notify-url", reply)
        yield self.assertNothingQueued()

    @inlineCallbacks
    def test_receivedMessageIdAndDateAdded(self) -> Any:
        reply, _ = yield self.submit(f"<{FROM}>", ["<a@example.org>"], simpleMessage())
        notification, stored = yield self.stored(reply)
        header = stored.split(b"\r\n\r\n", 1)[0]
        self.assertTrue(header.startswith(b"Received: from client.test"), header[:80])
        self.assertIn(notification.notification_id.encode(), header)
        self.assertIn(b"\r\nMessage-ID: <", header)
        self.assertIn(b"\r\nDate: ", header)

    @inlineCallbacks
    def test_existingMessageIdKept(self) -> Any:
        message = simpleMessage(Message_ID="<mine@acme.example>")
        reply, _ = yield self.submit(f"<{FROM}>", ["<a@example.org>"], message)
        _, stored = yield self.stored(reply)
        self.assertEqual(stored.count(b"Message-ID:"), 1)
        self.assertIn(b"<mine@acme.example>", stored)

    @inlineCallbacks
    def test_unparseableHeader(self) -> Any:
        reply, _ = yield self.submit(
            f"<{FROM}>", ["<a@example.org>"], b"this is not a header\r\n\r\nbody\r\n"
        )
        self.assertEqual(reply[:10], "550 5.6.0 ")
        yield self.assertNothingQueued()


class RequireAlternativeTests(SubmissionTestCase):
    accountSettings = {"require_alternative": True}

    @inlineCallbacks
    def test_multipartAlternativePasses(self) -> Any:
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = FROM, "a@example.org", "both"
        message.set_content("Plain text\n")
        message.add_alternative("<p>HTML</p>\n", subtype="html")
        reply, _ = yield self.submit(f"<{FROM}>", ["<a@example.org>"], message.as_bytes())
        self.assertIsNotNone(_ACCEPTED.match(reply), reply)

    @inlineCallbacks
    def test_textOnlyRefused(self) -> Any:
        reply, _ = yield self.submit(f"<{FROM}>", ["<a@example.org>"], simpleMessage())
        self.assertEqual(reply[:10], "550 5.6.0 ")
        yield self.assertNothingQueued()


class AttachmentTests(SubmissionTestCase):
    def messageWithAttachment(self) -> bytes:
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = FROM, "a@example.org", "att"
        message.set_content("See attached\n")
        message.add_attachment(
            b"%PDF-1.4 fake", maintype="application", subtype="pdf", filename="invoice.pdf"
        )
        return message.as_bytes()

    @inlineCallbacks
    def test_refuse(self) -> Any:
        yield self.relogin(attachments="refuse")
        reply, _ = yield self.submit(f"<{FROM}>", ["<a@example.org>"], self.messageWithAttachment())
        self.assertEqual(reply[:10], "550 5.6.0 ")
        yield self.assertNothingQueued()

    @inlineCallbacks
    def test_strip(self) -> Any:
        yield self.relogin(attachments="strip")
        reply, _ = yield self.submit(f"<{FROM}>", ["<a@example.org>"], self.messageWithAttachment())
        _, stored = yield self.stored(reply)
        self.assertNotIn(b"invoice.pdf", stored)
        self.assertIn(b"See attached", stored)


class RcptHeadersTests(SubmissionTestCase):
    accountSettings = {"require_rcpt_headers": True}

    @inlineCallbacks
    def test_toMustBeARecipient(self) -> Any:
        message = simpleMessage(To="other@example.org")
        reply, _ = yield self.submit(f"<{FROM}>", ["<a@example.org>"], message)
        self.assertEqual(reply[:10], "550 5.6.0 ")
        yield self.assertNothingQueued()

    @inlineCallbacks
    def test_matchingToPasses(self) -> Any:
        message = simpleMessage(To="a@example.org")
        reply, _ = yield self.submit(f"<{FROM}>", ["<a@example.org>"], message)
        self.assertIsNotNone(_ACCEPTED.match(reply), reply)


class LimitTests(SubmissionTestCase):
    @inlineCallbacks
    def test_rateLimit(self) -> Any:
        yield self.relogin(rate_per_second=1.0)
        reply, _ = yield self.submit(f"<{FROM}>", ["<a@example.org>"], simpleMessage())
        self.assertIsNotNone(_ACCEPTED.match(reply), reply)
        reply = yield self.session.command(f"MAIL FROM:<{FROM}>")
        self.assertEqual(reply[:10], "451 4.7.1 ")

    @inlineCallbacks
    def test_dailyQuota(self) -> Any:
        yield self.relogin(daily_quota=1)
        reply, _ = yield self.submit(f"<{FROM}>", ["<a@example.org>"], simpleMessage())
        self.assertIsNotNone(_ACCEPTED.match(reply), reply)
        reply = yield self.session.command(f"MAIL FROM:<{FROM}>")
        self.assertEqual(reply[:10], "452 4.2.2 ")

    @inlineCallbacks
    def test_dailyQuotaWithSessionsAtOnce(self) -> Any:
        """Two sessions pass MAIL with one message of the quota left, and end their DATA at
        the same moment: one is stored, the other gets 452 4.2.2, and the quota holds."""
        yield self.relogin(daily_quota=2)
        reply, _ = yield self.submit(f"<{FROM}>", ["<a@example.org>"], simpleMessage())
        self.assertIsNotNone(_ACCEPTED.match(reply), reply)
        sessions = [self.session, self.harness.connect()]
        yield sessions[1].login()
        for session in sessions:
            self.assertReply((yield session.command(f"MAIL FROM:<{FROM}>")), replies.SENDER_OK)
            yield session.command("RCPT TO:<b@example.org>")
            self.assertTrue((yield session.command("DATA")).startswith("354 "))
        for session in sessions:
            session.protocol.dataReceived(wire(simpleMessage()))
        answers = []
        for session in sessions:
            lines = yield session.send(b"")
            answers.append(lines[-1][:10])
        self.assertEqual(sorted(answers), ["250 2.0.0 ", "452 4.2.2 "])
        stats = yield self.harness.store.stats()
        self.assertEqual(stats.queued, 2)

    @inlineCallbacks
    def test_accountRecipientLimit(self) -> Any:
        yield self.relogin(max_recipients=2)
        yield self.session.command(f"MAIL FROM:<{FROM}>")
        for i in range(2):
            reply = yield self.session.command(f"RCPT TO:<r{i}@example.org>")
            self.assertReply(reply, replies.RECIPIENT_OK)
        reply = yield self.session.command("RCPT TO:<r3@example.org>")
        self.assertEqual(reply[:10], "452 4.5.3 ")

    @inlineCallbacks
    def test_accountMessageSize(self) -> Any:
        yield self.relogin(max_message_size=500)
        reply, _ = yield self.submit(
            f"<{FROM}>", ["<a@example.org>"], simpleMessage(body=("x" * 70 + "\n") * 10)
        )
        self.assertEqual(reply[:10], "552 5.3.4 ")
        yield self.assertNothingQueued()

    @inlineCallbacks
    def test_accountMessageSizeDeclared(self) -> Any:
        """A SIZE= over the account's own limit (below the listener's) is refused at MAIL,
        before the client sends the message; up to the limit it is not."""
        yield self.relogin(max_message_size=500)
        reply = yield self.session.command(f"MAIL FROM:<{FROM}> SIZE=501")
        self.assertEqual(reply[:10], "552 5.3.4 ")
        self.assertIn("account acme accepts at most 500", reply)
        reply = yield self.session.command(f"MAIL FROM:<{FROM}> SIZE=500")
        self.assertReply(reply, replies.SENDER_OK)
