"""Delivery status notifications (RFC 3464) and recognising them."""

from dataclasses import replace
from datetime import UTC, datetime
from email import message_from_bytes
from email.message import Message
from email.policy import SMTP
from typing import cast

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.message.dsn import (
    SUBJECT_DELAYED,
    SUBJECT_EXPIRED,
    SUBJECT_FAILED,
    FailedRecipient,
    buildBounce,
    isDeliveryReport,
)
from mailrelay.model import Notification, Recipient

RECEIVED_AT = datetime(2025, 3, 8, 14, 58, 30, tzinfo=UTC)
NOW = datetime(2025, 3, 8, 15, 5, 0, tzinfo=UTC)
ORIGINAL = (
    b"Received: from client.example (client.example [192.0.2.1])\r\n"
    b"\tby relay.example.com with ESMTPA id 12345; Sat, 08 Mar 2025 14:58:30 +0000\r\n"
    b"From: Sender <sender@example.com>\r\n"
    b"To: r@example.org, other@example.net\r\n"
    b"Subject: Quarterly report\r\n"
    b"Message-ID: <12345@relay.example.com>\r\n"
    b"\r\n"
    b"SECRET BODY TEXT\r\n"
)
NOTIFICATION = Notification(
    notification_id="12345",
    account="acme",
    sender="sender@example.com",
    recipients=(Recipient("r@example.org", "email"), Recipient("other@example.net", "email")),
    size=len(ORIGINAL),
    received_at=RECEIVED_AT,
)


def failure(
    address: str = "r@example.org",
    *,
    action: str = "failed",
    status: str = "5.1.1",
    remoteMta: str | None = "mx.example.org",
    diagnostic: str | None = "550 5.1.1 No such user",
) -> FailedRecipient:
    return FailedRecipient(
        recipient=Recipient(address, "email"),
        action=action,  # type: ignore[arg-type]
        status=status,
        remoteMta=remoteMta,
        diagnostic=diagnostic,
        lastAttempt=NOW,
    )


def bounce(
    failed: list[FailedRecipient] | None = None,
    *,
    reason: str = "failed",
    original: bytes = ORIGINAL,
    notification: Notification = NOTIFICATION,
) -> bytes:
    return buildBounce(
        original=original,
        notification=notification,
        failed=failed if failed is not None else [failure()],
        hostname="relay.example.com",
        now=NOW,
        reason=reason,
    )


def parse(report: bytes) -> Message:
    return message_from_bytes(report, policy=SMTP)


def statusGroups(report: bytes) -> list[Message]:
    """The delivery-status part's field groups: per-message first, then one per recipient."""
    part = cast(list[Message], parse(report).get_payload())[1]
    return cast(list[Message], part.get_payload())


def checkWellFormed(test: SynchronousTestCase, report: bytes) -> None:
    """CRLF line ends only, 7-bit, no line over 998 octets."""
    test.assertNotIn(b"\n", report.replace(b"\r\n", b""))
    test.assertNotIn(b"\r", report.replace(b"\r\n", b""))
    for line in report.split(b"\r\n"):
        test.assertLessEqual(len(line), 998)
    test.assertTrue(report.endswith(b"\r\n"))


class StructureTests(SynchronousTestCase):
    def test_multipartReport(self) -> None:
        report = bounce()
        message = parse(report)
        self.assertEqual(message.get_content_type(), "multipart/report")
        self.assertEqual(message.get_param("report-type"), "delivery-status")
        self.assertEqual(message.defects, [])
        parts = cast(list[Message], message.get_payload())
        self.assertEqual(
            [part.get_content_type() for part in parts],
            ["text/plain", "message/delivery-status", "text/rfc822-headers"],
        )
        for part in parts:
            self.assertEqual(part.defects, [])
        report.decode("ascii")
        checkWellFormed(self, report)

    def test_header(self) -> None:
        message = parse(bounce())
        self.assertEqual(message["From"], "Mail Delivery System <MAILER-DAEMON@relay.example.com>")
        self.assertEqual(message["To"], "sender@example.com")
        self.assertEqual(message["Subject"], SUBJECT_FAILED)
        self.assertEqual(message["Auto-Submitted"], "auto-replied")
        self.assertEqual(message["MIME-Version"], "1.0")
        self.assertEqual(message["Date"].datetime, NOW)
        self.assertRegex(str(message["Message-ID"]), r"^<[0-9a-f]+\.dsn@relay\.example\.com>$")

    def test_deterministic(self) -> None:
        self.assertEqual(bounce(), bounce())
        self.assertNotEqual(
            parse(bounce())["Message-ID"], parse(bounce([failure("x@example.org")]))["Message-ID"]
        )

    def test_expiredSubject(self) -> None:
        self.assertEqual(parse(bounce(reason="expired"))["Subject"], SUBJECT_EXPIRED)

    def test_delayedSubject(self) -> None:
        report = bounce([failure(action="delayed", status="4.4.1")])
        self.assertEqual(parse(report)["Subject"], SUBJECT_DELAYED)
        self.assertEqual(statusGroups(report)[1]["Action"], "delayed")

    def test_refusesWithoutAddressee(self) -> None:
        self.assertRaises(ValueError, bounce, notification=replace(NOTIFICATION, sender=""))
        self.assertRaises(ValueError, bounce, [])


class DeliveryStatusTests(SynchronousTestCase):
    def test_fields(self) -> None:
        groups = statusGroups(
            bounce(
                [
                    failure(),
                    failure("other@example.net", remoteMta=None, diagnostic=None, status="5.4.4"),
                ]
            )
        )
        self.assertEqual(len(groups), 3)
        perMessage, first, second = groups
        self.assertEqual(perMessage["Reporting-MTA"], "dns; relay.example.com")
        self.assertEqual(perMessage["Arrival-Date"], "Sat, 08 Mar 2025 14:58:30 +0000")
        self.assertEqual(first["Final-Recipient"], "rfc822; r@example.org")
        self.assertEqual(first["Action"], "failed")
        self.assertEqual(first["Status"], "5.1.1")
        self.assertEqual(first["Remote-MTA"], "dns; mx.example.org")
        self.assertEqual(first["Diagnostic-Code"], "smtp; 550 5.1.1 No such user")
        self.assertEqual(first["Last-Attempt-Date"], "Sat, 08 Mar 2025 15:05:00 +0000")
        self.assertEqual(second["Final-Recipient"], "rfc822; other@example.net")
        self.assertEqual(second["Status"], "5.4.4")
        self.assertIsNone(second["Remote-MTA"])
        self.assertIsNone(second["Diagnostic-Code"])

    def test_hostPrefixOfStatusTextDropped(self) -> None:
        """The status trail's ``host: reply`` form gives the reply alone as diagnostic."""
        report = bounce([failure(diagnostic="mx.example.org: 550 5.1.1 No such user")])
        self.assertEqual(statusGroups(report)[1]["Diagnostic-Code"], "smtp; 550 5.1.1 No such user")

    def test_localReason(self) -> None:
        report = bounce(
            [failure(remoteMta=None, diagnostic="Host not found: example.org", status="5.1.2")]
        )
        self.assertEqual(
            statusGroups(report)[1]["Diagnostic-Code"], "x-local; Host not found: example.org"
        )

    def test_badStatusReplaced(self) -> None:
        report = bounce([failure(status="550"), failure(action="delayed", status="")])
        groups = statusGroups(report)
        self.assertEqual(groups[1]["Status"], "5.0.0")
        self.assertEqual(groups[2]["Status"], "4.0.0")

    def test_longDiagnosticFolded(self) -> None:
        diagnostic = "550 5.7.1 " + " ".join(["word"] * 300) + " " + "x" * 2000
        report = bounce([failure(diagnostic=diagnostic)])
        checkWellFormed(self, report)
        code = str(statusGroups(report)[1]["Diagnostic-Code"])
        self.assertTrue(code.startswith("smtp; 550 5.7.1 word word"))

    def test_controlCharactersCannotInjectFields(self) -> None:
        report = bounce([failure(diagnostic="550 no\r\nAction: delivered\r\n\r\nX: y")])
        groups = statusGroups(report)
        self.assertEqual(len(groups), 2)
        self.assertEqual(groups[1]["Action"], "failed")
        checkWellFormed(self, report)


class NonAsciiTests(SynchronousTestCase):
    def test_utf8Recipient(self) -> None:
        """RFC 6533: a UTF-8 local part in the utf-8 address type's 7-bit form."""
        report = bounce([failure("jörg+tag@example.org", diagnostic="550 5.1.1 jörg unknown")])
        checkWellFormed(self, report)
        report.decode("ascii")
        group = statusGroups(report)[1]
        self.assertEqual(group["Final-Recipient"], "utf-8; j\\x{F6}rg\\x{2B}tag@example.org")
        self.assertEqual(group["Diagnostic-Code"], "smtp; 550 5.1.1 j\\x{F6}rg unknown")
        text = cast(list[Message], parse(report).get_payload())[0]
        self.assertEqual(text["Content-Transfer-Encoding"], "quoted-printable")
        body = cast(bytes, text.get_payload(decode=True)).decode("utf-8")
        self.assertIn("<jörg+tag@example.org>: failed", body)
        self.assertIn("550 5.1.1 jörg unknown", body)

    def test_asciiRecipientPlain(self) -> None:
        text = cast(list[Message], parse(bounce()).get_payload())[0]
        self.assertEqual(text.get_content_charset(), "us-ascii")
        body = cast(bytes, text.get_payload(decode=True)).decode("ascii")
        self.assertIn("<r@example.org>: failed", body)
        self.assertIn("550 5.1.1 No such user", body)
        self.assertIn("mx.example.org", body)

    def test_utf8Sender(self) -> None:
        """The To: field of a bounce to a UTF-8 address is UTF-8 (RFC 6532); the rest 7-bit."""
        report = bounce(notification=replace(NOTIFICATION, sender="jörg@example.com"))
        self.assertIn("To: <jörg@example.com>\r\n".encode(), report)
        header, _, body = report.partition(b"\r\n\r\n")
        body.decode("ascii")
        header.replace("To: <jörg@example.com>".encode(), b"").decode("ascii")

    def test_eightBitOriginalHeader(self) -> None:
        original = "Subject: Grüße\r\nFrom: a@example.com\r\n\r\nbody".encode()
        report = bounce(original=original)
        report.decode("ascii")
        checkWellFormed(self, report)
        headers = cast(list[Message], parse(report).get_payload())[2]
        self.assertEqual(headers["Content-Transfer-Encoding"], "quoted-printable")
        self.assertEqual(
            headers.get_payload(decode=True),
            "Subject: Grüße\r\nFrom: a@example.com\r\n".encode(),
        )


class OriginalHeaderTests(SynchronousTestCase):
    def test_headerWithoutBody(self) -> None:
        report = bounce()
        self.assertNotIn(b"SECRET BODY TEXT", report)
        headers = cast(list[Message], parse(report).get_payload())[2]
        self.assertEqual(
            headers.get_payload(decode=True), ORIGINAL[: ORIGINAL.index(b"\r\n\r\n") + 2]
        )

    def test_optionHeadersLeftOut(self) -> None:
        original = b"X-IB-Notify-URL: https://hooks.example.com/\r\n\t?token=secret\r\n" + ORIGINAL
        report = bounce(original=original)
        self.assertNotIn(b"secret", report)
        self.assertNotIn(b"X-IB", report)

    def test_longHeaderLineEncoded(self) -> None:
        original = b"X-Long: " + b"a" * 2000 + b"\r\n\r\nbody"
        report = bounce(original=original)
        checkWellFormed(self, report)
        headers = cast(list[Message], parse(report).get_payload())[2]
        self.assertEqual(headers.get_payload(decode=True), b"X-Long: " + b"a" * 2000 + b"\r\n")

    def test_boundaryInOriginalAvoided(self) -> None:
        first = bounce()
        boundary = parse(first).get_boundary()
        assert boundary is not None
        tricky = ORIGINAL.replace(b"Subject:", b"X-Trick: --" + boundary.encode() + b"\r\nSubject:")
        report = bounce(original=tricky)
        self.assertNotEqual(parse(report).get_boundary(), boundary)
        self.assertEqual(len(cast(list[Message], parse(report).get_payload())), 3)


class IsDeliveryReportTests(SynchronousTestCase):
    def test_ownBounce(self) -> None:
        self.assertTrue(isDeliveryReport(bounce()))

    def test_otherFormsOfReport(self) -> None:
        for header in (
            b'Content-Type: Multipart/Report; Report-Type="Delivery-Status"; boundary=x',
            b"content-type: multipart/report;\r\n\tboundary=x;\r\n report-type=delivery-status",
        ):
            with self.subTest(header=header):
                self.assertTrue(isDeliveryReport(b"From: a@b.example\r\n" + header + b"\r\n\r\nx"))

    def test_ordinaryMail(self) -> None:
        for message in (
            ORIGINAL,
            b"Content-Type: multipart/mixed; boundary=report\r\n\r\n",
            b"Content-Type: multipart/report; report-type=disposition-notification\r\n\r\n",
            b"Subject: multipart/report; report-type=delivery-status\r\n\r\n",
            b"Content-Type: text/plain\r\n\r\nContent-Type: multipart/report; "
            b"report-type=delivery-status\r\n",
            b"\r\nbody only",
            b"",
        ):
            with self.subTest(message=message):
                self.assertFalse(isDeliveryReport(message))
