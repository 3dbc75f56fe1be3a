"""A DATA section to phone numbers only: bare text, or a MIME message (SPEC §5)."""

from __future__ import annotations

from datetime import UTC, datetime

from twisted.trial.unittest import TestCase

from mailrelay.model import Account, Recipient
from mailrelay.policy.content import smsTextOf
from mailrelay.policy.decisions import Refusal
from tests.test_policy_content import prepareMessage

ACCOUNT = Account("acme", "x", sms_enabled=True, sms_segments=2)
PHONE = Recipient("+4477331234567", "sms")
NOW = datetime(2026, 12, 7, tzinfo=UTC)


def prepare(raw: bytes, recipients: tuple[Recipient, ...] = (PHONE,)) -> object:
    return prepareMessage(
        raw, ACCOUNT, recipients, senders=(), hostname="relay.test", now=NOW, received=b""
    )


class BareTextTests(TestCase):
    def test_issueText(self) -> None:
        prepared = prepare(b"Test SMS message via SMTP\r\n")
        self.assertEqual(prepared.smsText, "Test SMS message via SMTP")  # type: ignore[attr-defined]
        self.assertEqual(smsTextOf(prepared.data), "Test SMS message via SMTP")  # type: ignore[attr-defined]

    def test_colonLineIsText(self) -> None:
        prepared = prepare(b"Note: meet at 5\r\nBring keys\r\n")
        self.assertEqual(prepared.smsText, "Note: meet at 5\nBring keys")  # type: ignore[attr-defined]

    def test_messageStaysMessage(self) -> None:
        prepared = prepare(b"Subject: hi\r\n\r\nthe body\r\n")
        self.assertEqual(prepared.smsText, "the body")  # type: ignore[attr-defined]

    def test_unicodeText(self) -> None:
        prepared = prepare("Привет мир\r\n".encode())
        self.assertEqual(smsTextOf(prepared.data), "Привет мир")  # type: ignore[attr-defined]

    def test_notUtf8Refused(self) -> None:
        self.assertRaises(Refusal, prepare, b"\xff\xfe bad\r\n")

    def test_tooLongRefused(self) -> None:
        self.assertRaises(Refusal, prepare, b"a" * 307 + b"\r\n")

    def test_emailRecipientNeedsHeader(self) -> None:
        both = (PHONE, Recipient("a@b.example", "email"))
        self.assertRaises(Refusal, prepare, b"Test SMS\r\n", both)
