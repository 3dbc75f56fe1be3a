"""The end-of-DATA step: content rules, header options, and the bytes that are stored."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import SMTP
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.message.intake import PreparedMessage, rewriteMessage
from mailrelay.model import Account, HeaderOptions, Recipient, Sender
from mailrelay.policy.content import ContentDecision, checkContent, checkSize
from mailrelay.policy.decisions import Refusal
from mailrelay.policy.senders import EnvelopeSender
from mailrelay.policy.sms import SmsLength
from mailrelay.smtp.replies import (
    BARE_LINE_ENDING,
    CONTENT_REFUSED,
    MESSAGE_TOO_BIG,
    SENDER_NOT_ALLOWED,
)
from tests.test_policy_support import SENDERS, RefusalMixin, account

NOW = datetime(2025, 3, 8, 14, 58, 30, tzinfo=UTC)
BOB = Recipient("bob@example.org", "email")
PHONE = Recipient("+4477331234567", "sms")
SMS_DOMAINS = ("sms.example.com",)


@dataclass(frozen=True)
class Prepared:
    """What the avatar has at the end of DATA: policy's decision and the bytes to store."""

    content: ContentDecision
    message: PreparedMessage

    @property
    def data(self) -> bytes:
        return self.message.data

    @property
    def pieces(self) -> tuple[bytes | memoryview, ...]:
        return self.message.pieces

    @property
    def size(self) -> int:
        return self.message.size

    @property
    def messageId(self) -> str:
        return self.message.messageId

    @property
    def strippedAttachments(self) -> tuple[str, ...]:
        return self.message.strippedAttachments

    @property
    def options(self) -> HeaderOptions:
        return self.content.options

    @property
    def fromAddress(self) -> str | None:
        return self.content.fromAddress

    @property
    def smsText(self) -> str | None:
        return self.content.smsText

    @property
    def smsLength(self) -> SmsLength | None:
        return self.content.smsLength

    @property
    def ignoredOptions(self) -> tuple[str, ...]:
        return self.content.ignoredOptions


def prepareMessage(
    raw: bytes,
    acct: Account,
    recipients: Sequence[Recipient],
    *,
    senders: Sequence[Sender],
    hostname: str,
    now: datetime,
    envelopeSender: EnvelopeSender | None = None,
    smsDomains: Sequence[str] = (),
    notificationId: str | None = None,
    received: bytes = b"",
) -> Prepared:
    """Policy's decision on ``raw`` and the message rewritten as decided, as the avatar does."""
    content = checkContent(
        raw,
        acct,
        recipients,
        senders=senders,
        envelopeSender=envelopeSender,
        smsDomains=smsDomains,
    )
    message = rewriteMessage(
        raw,
        content,
        hostname=hostname,
        now=now,
        notificationId=notificationId,
        received=received,
    )
    return Prepared(content, message)


def wire(message: EmailMessage) -> bytes:
    return message.as_bytes(policy=SMTP)


def mail(body: str = "Hello Bob.\n", **headers: str) -> EmailMessage:
    message = EmailMessage()
    fields = {"From": "Jo <jo@example.com>", "To": "bob@example.org", "Subject": "Hello"}
    fields.update((name.replace("_", "-"), value) for name, value in headers.items())
    for name, value in fields.items():
        message[name] = value
    message.set_content(body)
    return message


def withAttachment(message: EmailMessage) -> EmailMessage:
    message.add_attachment(
        b"%PDF-1.4 not really", maintype="application", subtype="pdf", filename="invoice.pdf"
    )
    return message


def prepare(
    raw: bytes,
    acct: Account | None = None,
    recipients: tuple[Recipient, ...] = (BOB,),
    **kwargs: Any,
) -> Prepared:
    kwargs.setdefault("senders", SENDERS)
    kwargs.setdefault("hostname", "relay.example.com")
    kwargs.setdefault("now", NOW)
    kwargs.setdefault("smsDomains", SMS_DOMAINS)
    return prepareMessage(raw, acct or account(), recipients, **kwargs)


def headerOf(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0]


class SizeTests(RefusalMixin, SynchronousTestCase):
    def test_accountLimit(self) -> None:
        raw = wire(mail("x" * 500))
        prepare(raw, account(max_message_size=len(raw)))
        e = self.assertRefused(
            MESSAGE_TOO_BIG, prepare, raw, account(max_message_size=len(raw) - 1)
        )
        self.assertIn(str(len(raw)), e.reply.text)

    def test_declaredSize(self) -> None:
        checkSize(1000, account(), 1000)
        self.assertRefused(MESSAGE_TOO_BIG, checkSize, 1001, account(), 1000)
        self.assertRefused(MESSAGE_TOO_BIG, checkSize, 1001, account(max_message_size=1000))


class StructureTests(RefusalMixin, SynchronousTestCase):
    def test_noHeaderBodySeparation(self) -> None:
        e = self.assertRefused(CONTENT_REFUSED, prepare, b"Hello Bob,\r\nhow are you?\r\n")
        self.assertIn("Line 1", e.reply.text)

    def test_garbageHeaderLine(self) -> None:
        raw = b"From: jo@example.com\r\nthis is not a header\r\n\r\nbody\r\n"
        e = self.assertRefused(CONTENT_REFUSED, prepare, raw)
        self.assertIn("Line 2", e.reply.text)

    def test_continuationFirst(self) -> None:
        self.assertRefused(CONTENT_REFUSED, prepare, b" From: jo@example.com\r\n\r\nbody\r\n")

    def test_bareLineFeedInHeader(self) -> None:
        raw = b"From: jo@example.com\nTo: bob@example.org\r\n\r\nbody\r\n"
        self.assertRefused(BARE_LINE_ENDING, prepare, raw)

    def test_multipartWithoutBoundary(self) -> None:
        raw = b"From: jo@example.com\r\nContent-Type: multipart/mixed\r\n\r\nbody\r\n"
        e = self.assertRefused(CONTENT_REFUSED, prepare, raw)
        self.assertIn("boundary", e.reply.text)

    def test_boundaryNotInBody(self) -> None:
        raw = b'From: jo@example.com\r\nContent-Type: multipart/mixed; boundary="b1"\r\n\r\nx\r\n'
        self.assertRefused(CONTENT_REFUSED, prepare, raw)

    def test_headersOnly(self) -> None:
        prepared = prepare(b"From: jo@example.com\r\nSubject: hi\r\n")
        self.assertTrue(prepared.data.endswith(b"\r\n\r\n"))


class FromHeaderTests(RefusalMixin, SynchronousTestCase):
    def test_registered(self) -> None:
        prepared = prepare(wire(mail(From='"Jo, Sales" <JO@Example.COM>')))
        self.assertEqual(prepared.fromAddress, "JO@example.com")

    def test_encodedDisplayName(self) -> None:
        raw = wire(mail(From="Jörg Müller <jo@bücher.de>"))
        self.assertEqual(prepare(raw).fromAddress, "jo@xn--bcher-kva.de")

    def test_notRegistered(self) -> None:
        e = self.assertRefused(SENDER_NOT_ALLOWED, prepare, wire(mail(From="eve@evil.example")))
        self.assertIn("eve@evil.example", e.reply.text)

    def test_anyAddressOfSeveral(self) -> None:
        raw = wire(mail(From="jo@example.com, eve@evil.example", Sender="jo@example.com"))
        self.assertRefused(SENDER_NOT_ALLOWED, prepare, raw)

    def test_missing(self) -> None:
        raw = b"To: bob@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
        e = self.assertRefused(CONTENT_REFUSED, prepare, raw)
        self.assertIn("From:", e.reply.text)

    def test_twice(self) -> None:
        raw = b"From: jo@example.com\r\nFrom: jo@example.com\r\n\r\nbody\r\n"
        self.assertRefused(CONTENT_REFUSED, prepare, raw)

    def test_unparseable(self) -> None:
        raw = b"From: <<<@>>>\r\n\r\nbody\r\n"
        self.assertRefused(CONTENT_REFUSED, prepare, raw)

    def test_malformedListsRefused(self) -> None:
        """
        Address lists the ``email`` parser reads only in part (it keeps the registered first
        address and drops the rest, with a defect) are refused: a mail client or a DMARC
        check may well read the other address as the author.
        """
        for value in (
            b"jo@example.com <eve@evil.example>",
            b"<jo@example.com> <eve@evil.example>",
            b"jo@example.com;eve@evil.example",
            b'"x" <jo@example.com>eve@evil.example',
            b"jo@example.com (comment <eve@evil.example>",
            b"<jo@example.com",
        ):
            raw = b"From: " + value + b"\r\nTo: bob@example.org\r\n\r\nbody\r\n"
            e = self.assertRefused(CONTENT_REFUSED, prepare, raw)
            self.assertIn("From: header is not a valid address list", e.reply.text)

    def test_unusualButValidFormsPass(self) -> None:
        for value in (
            b'"Jo" <jo@example.com>',
            b"jo@example.com (Jo)",
            b"Jo.Smith <jo@example.com>",  # obsolete syntax (an unquoted dot), still one address
            b"Sales: jo@example.com;",
        ):
            raw = b"From: " + value + b"\r\nTo: bob@example.org\r\n\r\nbody\r\n"
            self.assertEqual(prepare(raw).fromAddress, "jo@example.com", value)

    def test_nulInHeaderRefused(self) -> None:
        raw = b"From: <jo@example.com>\x00<eve@evil.example>\r\n\r\nbody\r\n"
        e = self.assertRefused(CONTENT_REFUSED, prepare, raw)
        self.assertIn("NUL", e.reply.text)

    def test_headerSizeLimit(self) -> None:
        """A header block over 256 KiB is refused before any field is parsed; one just under
        passes (the message itself may be larger: the limit is the header's)."""
        filler = b"X-Filler: " + b"a" * 990 + b"\r\n"
        base = b"From: jo@example.com\r\nTo: bob@example.org\r\n"
        fits = base + filler * ((256 * 1024 - len(base)) // len(filler))
        self.assertEqual(
            prepare(fits + b"\r\n" + b"body\r\n" * 40000).fromAddress, "jo@example.com"
        )
        e = self.assertRefused(CONTENT_REFUSED, prepare, fits + filler + b"\r\nbody\r\n")
        self.assertIn("256 KiB", e.reply.text)


class AlternativeTests(RefusalMixin, SynchronousTestCase):
    ACCOUNT = account(require_alternative=True)

    def test_textAndHtmlPass(self) -> None:
        message = mail("Hello Bob.\n")
        message.add_alternative("<p>Hello <b>Bob</b>.</p>", subtype="html")
        raw = wire(message)
        prepared = prepare(raw, self.ACCOUNT)
        self.assertTrue(prepared.data.endswith(raw.split(b"\r\n\r\n", 1)[1]))

    def test_textOnlyRefused(self) -> None:
        e = self.assertRefused(CONTENT_REFUSED, prepare, wire(mail()), self.ACCOUNT)
        self.assertIn("text/html", e.reply.text)

    def test_multipartWithoutHtmlRefused(self) -> None:
        raw = wire(withAttachment(mail()))
        e = self.assertRefused(CONTENT_REFUSED, prepare, raw, self.ACCOUNT)
        self.assertIn("no text/html", e.reply.text)

    def test_htmlAttachmentDoesNotCount(self) -> None:
        message = mail()
        message.add_attachment("<p>x</p>", subtype="html", filename="page.html")
        self.assertRefused(CONTENT_REFUSED, prepare, wire(message), self.ACCOUNT)


class AttachmentTests(RefusalMixin, SynchronousTestCase):
    def test_allow(self) -> None:
        raw = wire(withAttachment(mail()))
        prepared = prepare(raw)
        self.assertIn(b"invoice.pdf", prepared.data)
        self.assertEqual(prepared.strippedAttachments, ())

    def test_strip(self) -> None:
        message = mail()
        message.add_alternative("<p>Hello</p>", subtype="html")
        raw = wire(withAttachment(message))
        prepared = prepare(raw, account(attachments="strip"))
        self.assertEqual(prepared.strippedAttachments, ("invoice.pdf",))
        self.assertNotIn(b"invoice.pdf", prepared.data)
        self.assertNotIn(b"PDF", prepared.data)
        out = message_from_bytes(prepared.data, policy=SMTP)
        self.assertEqual(
            [part.get_content_type() for part in out.walk()],
            ["multipart/mixed", "multipart/alternative", "text/plain", "text/html"],
        )
        self.assertEqual(out["Subject"], "Hello")
        self.assertIn(b"\r\n", prepared.data)
        self.assertNotIn(b"\n", prepared.data.replace(b"\r\n", b""))

    def test_stripWithoutAttachmentsKeepsBody(self) -> None:
        message = mail()
        message.add_alternative("<p>Hello</p>", subtype="html")
        raw = wire(message)
        prepared = prepare(raw, account(attachments="strip"))
        self.assertEqual(prepared.data.split(b"\r\n\r\n", 1)[1], raw.split(b"\r\n\r\n", 1)[1])

    def test_refuse(self) -> None:
        raw = wire(withAttachment(mail()))
        e = self.assertRefused(CONTENT_REFUSED, prepare, raw, account(attachments="refuse"))
        self.assertIn("invoice.pdf", e.reply.text)
        prepare(wire(mail()), account(attachments="refuse"))

    def test_wholeMessageIsAnAttachment(self) -> None:
        raw = (
            b"From: jo@example.com\r\nContent-Type: application/pdf\r\n"
            b'Content-Disposition: attachment; filename="a.pdf"\r\n\r\nJVBERi0=\r\n'
        )
        for policy in ("strip", "refuse"):
            self.assertRefused(CONTENT_REFUSED, prepare, raw, account(attachments=policy))
        prepare(raw)


class NestingTests(RefusalMixin, SynchronousTestCase):
    """The MIME parser's time grows with lines x nesting depth: a message is parsed only
    with up to 32 multipart parts."""

    @staticmethod
    def nested(depth: int) -> bytes:
        head = b"From: jo@example.com\r\nTo: bob@example.org\r\nMIME-Version: 1.0\r\n"
        opening = b"".join(
            b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (d, d)
            for d in range(depth)
        )
        leaf = b"Content-Type: text/plain\r\n\r\nhello\r\n"
        closing = b"".join(b"\r\n--b%d--\r\n" % d for d in reversed(range(depth)))
        return head + opening + leaf + closing

    def test_deepNestingRefused(self) -> None:
        strip = account(attachments="strip")
        prepare(self.nested(32), strip)
        e = self.assertRefused(CONTENT_REFUSED, prepare, self.nested(33), strip)
        self.assertIn("more than 32 multipart parts", e.reply.text)

    def test_notCountedWhenNoRuleParses(self) -> None:
        """Without a rule that needs the structure the message is not parsed at all."""
        prepare(self.nested(100))


class RcptHeaderTests(RefusalMixin, SynchronousTestCase):
    ACCOUNT = account(require_rcpt_headers=True, sms_enabled=True)

    def test_allAmongRecipients(self) -> None:
        carol = Recipient("carol@example.net", "email")
        raw = wire(mail(To="Bob <bob@EXAMPLE.org>", Cc="carol@example.net"))
        prepare(raw, self.ACCOUNT, (BOB, carol))

    def test_ccNotAmongRecipients(self) -> None:
        raw = wire(mail(Cc="carol@example.net"))
        e = self.assertRefused(CONTENT_REFUSED, prepare, raw, self.ACCOUNT)
        self.assertIn("carol@example.net", e.reply.text)
        self.assertIn("Cc:", e.reply.text)

    def test_toNotAmongRecipients(self) -> None:
        raw = wire(mail(To="mallory@example.org"))
        self.assertRefused(CONTENT_REFUSED, prepare, raw, self.ACCOUNT)

    def test_malformedToRefused(self) -> None:
        """A To: the parser reads only in part (``mallory`` dropped) does not pass as Bob's."""
        raw = b"From: jo@example.com\r\nTo: bob@example.org <mallory@example.org>\r\n\r\nhi\r\n"
        e = self.assertRefused(CONTENT_REFUSED, prepare, raw, self.ACCOUNT)
        self.assertIn("To: header is not a valid address list", e.reply.text)

    def test_bccNotChecked(self) -> None:
        prepare(wire(mail(Bcc="hidden@example.org")), self.ACCOUNT, (BOB,))

    def test_phoneAtSmsDomain(self) -> None:
        raw = wire(mail("hi", To="004477331234567@sms.example.com"))
        prepare(raw, self.ACCOUNT, (PHONE,))

    def test_groupWithoutMembers(self) -> None:
        prepare(wire(mail(To="undisclosed-recipients:;")), self.ACCOUNT)

    def test_offByDefault(self) -> None:
        prepare(wire(mail(To="mallory@example.org")))


class OptionTests(RefusalMixin, SynchronousTestCase):
    def test_parsedAndRemoved(self) -> None:
        raw = (
            b"From: jo@example.com\r\nX-IB-bulk-id: bulk-7\r\nTo: bob@example.org\r\n"
            b"X-IB-notify-url: https://hooks.example.com/dlr\r\n"
            b"X-IB-callback-data: first half\r\n second half\r\n"
            b"x-ib-intermediate-report: true\r\nX-IB-future-option: 1\r\n"
            b"Message-ID: <a@b>\r\nDate: Sat, 08 Mar 2025 14:00:00 +0000\r\n\r\nbody\r\n"
        )
        prepared = prepare(raw)
        self.assertEqual(
            prepared.options,
            HeaderOptions(
                bulk_id="bulk-7",
                notify_url="https://hooks.example.com/dlr",
                callback_data="first half second half",
                intermediate_report=True,
            ),
        )
        self.assertEqual(prepared.ignoredOptions, ("x-ib-future-option",))
        self.assertEqual(
            prepared.data,
            b"From: jo@example.com\r\nTo: bob@example.org\r\n"
            b"Message-ID: <a@b>\r\nDate: Sat, 08 Mar 2025 14:00:00 +0000\r\n\r\nbody\r\n",
        )

    def test_malformedNamesTheHeader(self) -> None:
        raw = wire(mail(X_IB_notify_content_type="text/html"))
        e = self.assertRefused(CONTENT_REFUSED, prepare, raw)
        self.assertIn("X-IB-notify-content-type", e.reply.text)

    def test_notUtf8(self) -> None:
        raw = b"From: jo@example.com\r\nX-IB-callback-data: \xff\xfe\r\n\r\nbody\r\n"
        e = self.assertRefused(CONTENT_REFUSED, prepare, raw)
        self.assertIn("X-IB-callback-data", e.reply.text)


class AddedHeaderTests(SynchronousTestCase):
    def test_messageIdAndDateAddedWhenMissing(self) -> None:
        raw = b"From: jo@example.com\r\nTo: bob@example.org\r\n\r\nbody\r\n"
        prepared = prepare(raw, notificationId="100000009020772")
        self.assertEqual(prepared.messageId, "<100000009020772@relay.example.com>")
        self.assertEqual(
            prepared.data,
            b"From: jo@example.com\r\nTo: bob@example.org\r\n"
            b"Message-ID: <100000009020772@relay.example.com>\r\n"
            b"Date: Sat, 08 Mar 2025 14:58:30 +0000\r\n\r\nbody\r\n",
        )

    def test_randomMessageIdWithoutNotificationId(self) -> None:
        raw = b"From: jo@example.com\r\n\r\nbody\r\n"
        first, second = prepare(raw).messageId, prepare(raw).messageId
        self.assertNotEqual(first, second)
        self.assertTrue(first.endswith("@relay.example.com>"))

    def test_keptWhenPresent(self) -> None:
        raw = wire(mail(Message_ID="<own@client.example>", Date="Fri, 07 Mar 2025 10:00:00 +0000"))
        prepared = prepare(raw, notificationId="1")
        self.assertEqual(prepared.messageId, "<own@client.example>")
        self.assertIs(prepared.data, raw)  # nothing to change: the very same bytes

    def test_emptyMessageIdReplaced(self) -> None:
        raw = b"From: jo@example.com\r\nMessage-ID:\r\nDate: x\r\n\r\nbody\r\n"
        prepared = prepare(raw, notificationId="9")
        self.assertEqual(headerOf(prepared.data).count(b"Message-ID"), 1)
        self.assertEqual(prepared.messageId, "<9@relay.example.com>")

    def test_receivedOnTopAndBccRemoved(self) -> None:
        raw = wire(mail(Bcc="hidden@example.org", Message_ID="<m@x>", Date="x"))
        prepared = prepare(raw, received=b"Received: from x\r\n\tby y; z\r\n")
        self.assertTrue(prepared.data.startswith(b"Received: from x\r\n\tby y; z\r\nFrom: "))
        self.assertNotIn(b"hidden@example.org", prepared.data)

    def test_bodyNotCopied(self) -> None:
        """The body is not copied, whether the header is kept (the message as it arrived after
        ``Received:``) or rebuilt (a Message-ID added: a view of the body): only the store
        copies it."""
        received = b"Received: from x\r\n\tby y; z\r\n"
        for headers in ({"Message_ID": "<m@x>", "Date": "x"}, {}):
            raw = wire(mail(**headers))
            prepared = prepare(raw, received=received, notificationId="9")
            last = prepared.pieces[-1]  # the message as it arrived, or a view of its body
            self.assertIs(last.obj if isinstance(last, memoryview) else last, raw)
            self.assertEqual(prepared.pieces[0], received)
            self.assertEqual(prepared.size, len(prepared.data))
            self.assertTrue(prepared.data.endswith(raw[raw.index(b"\r\n\r\n") + 4 :]))


class SmsTests(RefusalMixin, SynchronousTestCase):
    ACCOUNT = account(sms_enabled=True)
    SENDER = EnvelopeSender("+393331234567", "sms")

    def smsMail(self, text: str, **headers: str) -> bytes:
        raw = b"From: +393331234567\r\nTo: +4477331234567\r\nSubject: SMS\r\n"
        for name, value in headers.items():
            raw += f"{name}: {value}\r\n".encode()
        return raw + b"\r\n" + text.encode("utf-8") + b"\r\n"

    def test_gatewayStyleSubmission(self) -> None:
        """``MAIL FROM: +393331234567``, ``RCPT TO: +4477331234567``, a short text."""
        prepared = prepare(
            self.smsMail("Your code is 1234"),
            self.ACCOUNT,
            (PHONE,),
            envelopeSender=self.SENDER,
        )
        self.assertEqual(prepared.smsText, "Your code is 1234")
        self.assertEqual(prepared.fromAddress, None)
        assert prepared.smsLength is not None
        self.assertEqual(prepared.smsLength.segments, 1)

    def test_160Accepted161Refused(self) -> None:
        prepare(self.smsMail("a" * 160), self.ACCOUNT, (PHONE,), envelopeSender=self.SENDER)
        e = self.assertRefused(
            CONTENT_REFUSED,
            prepare,
            self.smsMail("a" * 161),
            self.ACCOUNT,
            (PHONE,),
            envelopeSender=self.SENDER,
        )
        self.assertIn("161", e.reply.text)

    def test_ucs2Limit(self) -> None:
        def smsMail(text: str) -> bytes:
            return wire(mail(text))

        prepared = prepare(smsMail("ж" * 70), self.ACCOUNT, (PHONE,))
        assert prepared.smsLength is not None
        self.assertEqual(prepared.smsLength.encoding, "UCS-2")
        self.assertRefused(CONTENT_REFUSED, prepare, smsMail("ж" * 71), self.ACCOUNT, (PHONE,))

    def test_segmentLimitOfAccount(self) -> None:
        two = account(sms_enabled=True, sms_segments=2)
        prepared = prepare(wire(mail("a" * 300)), two, (PHONE,))
        assert prepared.smsLength is not None
        self.assertEqual(prepared.smsLength.segments, 2)

    def test_textFromMultipartAlternative(self) -> None:
        message = mail("Short text\n")
        message.add_alternative("<p>" + "long html " * 100 + "</p>", subtype="html")
        prepared = prepare(wire(message), self.ACCOUNT, (PHONE, BOB))
        self.assertEqual(prepared.smsText, "Short text")

    def test_quotedPrintableDecoded(self) -> None:
        message = mail()
        message.set_content("Grüße €5\n", cte="quoted-printable")
        prepared = prepare(wire(message), self.ACCOUNT, (PHONE,))
        self.assertEqual(prepared.smsText, "Grüße €5")

    def test_htmlOnlyRefused(self) -> None:
        message = mail()
        message.set_content("<p>hi</p>", subtype="html")
        e = self.assertRefused(CONTENT_REFUSED, prepare, wire(message), self.ACCOUNT, (PHONE,))
        self.assertIn("text/plain", e.reply.text)

    def test_emptyTextRefused(self) -> None:
        self.assertRefused(CONTENT_REFUSED, prepare, wire(mail("\n\n")), self.ACCOUNT, (PHONE,))

    def test_unknownCharsetRefused(self) -> None:
        raw = b"From: jo@example.com\r\nContent-Type: text/plain; charset=x-nonsense\r\n\r\nhi\r\n"
        self.assertRefused(CONTENT_REFUSED, prepare, raw, self.ACCOUNT, (PHONE,))

    def test_fromAddressStillChecked(self) -> None:
        raw = self.smsMail("hi").replace(b"From: +393331234567", b"From: eve@evil.example")
        self.assertRefused(
            SENDER_NOT_ALLOWED, prepare, raw, self.ACCOUNT, (PHONE,), envelopeSender=self.SENDER
        )


_HEADER_LINES = st.sampled_from(
    [
        b"From: jo@example.com",
        b"From: =?utf-8?q?J=C3=B6?= <jo@example.com>",
        b"To: bob@example.org, <+4477331234567@sms.example.com>",
        b'Cc: "a\\"b" <x@[1.2.3.4]>, group: a@b.c;',
        b"Content-Type: multipart/mixed; boundary=b",
        b"Content-Type: multipart/alternative; boundary*0*=utf-8''%E2%82; boundary*1=x",
        b"Content-Type: text/plain; charset=utf-7",
        b"Content-Type: message/rfc822",
        b"Content-Disposition: attachment; filename*=''%ff",
        b"Content-Transfer-Encoding: base64",
        b"X-IB-notify-url: https://h.example/x",
        b"X-IB-bulk-id: \xc3\xa9",
        b"Message-ID: <x@y>",
        b" folded",
        b"--b",
        b"--b--",
        b"",
        b"hello \xff",
    ]
)


class FuzzTests(SynchronousTestCase):
    ACCOUNT = account(
        sms_enabled=True,
        sms_segments=3,
        require_alternative=True,
        require_rcpt_headers=True,
        attachments="strip",
    )

    def assertOnlyRefused(self, raw: bytes, acct: Account) -> None:
        try:
            prepared = prepare(raw, acct, (BOB, PHONE), notificationId="1")
        except Refusal:
            return
        self.assertIsInstance(prepared.data, bytes)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=300))
    def test_arbitraryBytes(self, raw: bytes) -> None:
        self.assertOnlyRefused(raw, self.ACCOUNT)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        st.lists(_HEADER_LINES | st.binary(max_size=20), max_size=14),
        st.sampled_from(["allow", "strip", "refuse"]),
        st.booleans(),
    )
    def test_messageLikeBytes(
        self, lines: list[bytes], attachments: str, alternative: bool
    ) -> None:
        acct = account(
            sms_enabled=True,
            require_rcpt_headers=True,
            attachments=attachments,
            require_alternative=alternative,
        )
        self.assertOnlyRefused(b"\r\n".join(lines) + b"\r\n", acct)
