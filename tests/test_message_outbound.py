"""A stored message made ready to leave: X-IB-* removed, Message-ID and Date added."""

import time
from datetime import UTC, datetime

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.headerblock import headerFields, splitMessage
from mailrelay.message.outbound import prepareForDelivery, senderDomain

RECEIVED_AT = datetime(2025, 3, 8, 14, 58, 30, 123456, tzinfo=UTC)
DATE = "Sat, 08 Mar 2025 14:58:30 +0000"


def prepare(message: bytes) -> bytes:
    return prepareForDelivery(
        message, hostname="relay.example.com", notificationId="12345", receivedAt=RECEIVED_AT
    )


def headerOf(message: bytes) -> bytes:
    return splitMessage(message)[0]


COMPLETE = (
    b"Received: from c (c [192.0.2.1])\r\n\tby relay.example.com with ESMTPA\r\n"
    b"From: Sender <sender@example.com>\r\n"
    b"To: r@example.org\r\n"
    b"Subject: hello\r\n"
    b"Date: Fri, 07 Mar 2025 10:00:00 +0100\r\n"
    b"Message-ID: <abc@client.example>\r\n"
    b"\r\n"
    b"Body line\r\n"
)


class OptionHeaderTests(SynchronousTestCase):
    def test_removedInAnyCaseWithContinuations(self) -> None:
        """Every X-IB-* field goes, its folded lines with it; the other fields stay, in order."""
        message = (
            b"X-IB-Bulk-Id: bulk-1\r\n"
            b"From: sender@example.com\r\n"
            b"x-ib-notify-url: https://hooks.example.com/\r\n"
            b"\tcontinued/path\r\n"
            b"  and more\r\n"
            b"Subject: kept\r\n"
            b"\tfolded subject\r\n"
            b"X-iB-CALLBACK-DATA: secret\r\n"
            b"X-IB-Unknown-Option: also removed\r\n"
            b"X-IBM-Header: not an option\r\n"
            b"Date: Fri, 07 Mar 2025 10:00:00 +0100\r\n"
            b"Message-ID: <a@b>\r\n"
            b"\r\n"
            b"X-IB-Bulk-Id: in the body, untouched\r\n"
        )
        prepared = prepare(message)
        self.assertEqual(
            prepared,
            b"From: sender@example.com\r\n"
            b"Subject: kept\r\n"
            b"\tfolded subject\r\n"
            b"X-IBM-Header: not an option\r\n"
            b"Date: Fri, 07 Mar 2025 10:00:00 +0100\r\n"
            b"Message-ID: <a@b>\r\n"
            b"\r\n"
            b"X-IB-Bulk-Id: in the body, untouched\r\n",
        )

    def test_completeMessageUnchanged(self) -> None:
        """A message with nothing to change comes back as the very same bytes."""
        self.assertIs(prepare(COMPLETE), COMPLETE)

    def test_idempotent(self) -> None:
        message = b"X-IB-Bulk-Id: 1\r\nFrom: a@example.com\r\n\r\nbody\r\n"
        once = prepare(message)
        self.assertEqual(prepare(once), once)

    def test_deterministic(self) -> None:
        """Retries re-send identical bytes: the same input always gives the same output."""
        message = b"From: a@example.com\r\nX-IB-Bulk-Id: 1\r\n\r\nbody\r\n"
        self.assertEqual(prepare(message), prepare(message))


class AddedFieldTests(SynchronousTestCase):
    def test_messageIdAndDateAddedWhenMissing(self) -> None:
        prepared = prepare(b"From: a@example.com\r\nSubject: s\r\n\r\nbody\r\n")
        self.assertEqual(
            prepared,
            b"From: a@example.com\r\nSubject: s\r\n"
            b"Message-ID: <12345@relay.example.com>\r\n"
            b"Date: " + DATE.encode() + b"\r\n"
            b"\r\nbody\r\n",
        )

    def test_notAddedWhenPresentInAnyCase(self) -> None:
        message = (
            b"FROM: a@example.com\r\nmessage-id: <x@y>\r\nDATE: Fri, 07 Mar 2025 10:00:00 +0100"
            b"\r\n\r\nbody\r\n"
        )
        self.assertEqual(prepare(message), message)

    def test_emptyMessageIdReplaced(self) -> None:
        prepared = prepare(b"Message-ID:  \r\nDate: " + DATE.encode() + b"\r\n\r\nbody\r\n")
        self.assertEqual(
            prepared,
            b"Date: " + DATE.encode() + b"\r\n"
            b"Message-ID: <12345@relay.example.com>\r\n\r\nbody\r\n",
        )

    def test_naiveReceivedAtIsUtc(self) -> None:
        prepared = prepareForDelivery(
            b"Message-ID: <a@b>\r\n\r\nx",
            hostname="h.example",
            notificationId="1",
            receivedAt=datetime(2025, 3, 8, 14, 58, 30),
        )
        self.assertIn(b"Date: " + DATE.encode() + b"\r\n", prepared)

    def test_unsafeIdCharactersReplaced(self) -> None:
        prepared = prepareForDelivery(
            b"Date: x\r\n\r\n",
            hostname="h.example",
            notificationId="a b>\r\n",
            receivedAt=RECEIVED_AT,
        )
        self.assertIn(b"Message-ID: <a-b---@h.example>\r\n", prepared)

    def test_headerOnlyMessage(self) -> None:
        """A message without the empty line gets one after the added fields."""
        prepared = prepare(b"From: a@example.com\r\nX-IB-Bulk-Id: 1")
        self.assertEqual(
            prepared,
            b"From: a@example.com\r\n"
            b"Message-ID: <12345@relay.example.com>\r\n"
            b"Date: " + DATE.encode() + b"\r\n\r\n",
        )
        self.assertEqual(
            prepare(b"From: a@example.com\r\nMessage-ID: <a@b>\r\nDate: x"),
            b"From: a@example.com\r\nMessage-ID: <a@b>\r\nDate: x",
        )

    def test_noHeaderAtAll(self) -> None:
        self.assertEqual(
            prepare(b"\r\nbody\r\n"),
            b"Message-ID: <12345@relay.example.com>\r\nDate: "
            + DATE.encode()
            + b"\r\n\r\nbody\r\n",
        )


class BodyTests(SynchronousTestCase):
    def test_eightBitBodyUntouched(self) -> None:
        body = bytes(range(256)).replace(b"\r", b"").replace(b"\n", b"") * 4 + b"\r\n.\r\n\r\n"
        body += "Grüße, 日本\r\n".encode() + b"\xff\xfe bare\nLF and bare\rCR\r\n"
        prepared = prepare(b"X-IB-Bulk-Id: 1\r\nFrom: a@example.com\r\n\r\n" + body)
        self.assertTrue(prepared.endswith(b"\r\n\r\n" + body))
        self.assertEqual(prepared[prepared.index(b"\r\n\r\n") + 4 :], body)

    def test_eightBitHeaderKept(self) -> None:
        message = "Subject: Grüße\r\nX-IB-Bulk-Id: 1\r\n\r\nx".encode()
        self.assertTrue(prepare(message).startswith("Subject: Grüße\r\n".encode()))

    def test_largeMessageFast(self) -> None:
        """100 KiB of body, a big header: the body is not scanned line by line."""
        header = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 60) for i in range(200))
        body = (b"a" * 98 + b"\r\n") * 1024
        message = b"X-IB-Bulk-Id: 1\r\n" + header + b"\r\n" + body
        start = time.perf_counter()
        for _ in range(100):
            prepared = prepare(message)
        elapsed = (time.perf_counter() - start) / 100
        self.assertTrue(prepared.endswith(body))
        # About 0.1 ms here; a generous bound for a busy machine.
        self.assertLess(elapsed, 0.01)


class HeaderFieldTests(SynchronousTestCase):
    def test_fieldsWithContinuations(self) -> None:
        block = b"A: 1\r\n\tx\r\nb : 2\r\nnot a field\r\n"
        fields = list(headerFields(block))
        self.assertEqual([f.name for f in fields], ["a", "b", ""])
        self.assertEqual(block[fields[0].start : fields[0].end], b"A: 1\r\n\tx\r\n")
        self.assertEqual(block[fields[2].start : fields[2].end], b"not a field\r\n")

    def test_split(self) -> None:
        self.assertEqual(splitMessage(b"A: 1\r\n\r\nbody"), (b"A: 1\r\n", 8))
        self.assertEqual(splitMessage(b"\r\nbody"), (b"", 2))
        self.assertEqual(splitMessage(b"A: 1\r\n"), (b"A: 1\r\n", 6))


class SenderDomainTests(SynchronousTestCase):
    def test_fromHeader(self) -> None:
        message = b'From: "Sales, Europe" <Sales@Mail.Example.COM>\r\n\r\nx'
        self.assertEqual(senderDomain(message, "bounce@other.example"), "mail.example.com")

    def test_fromHeaderFolded(self) -> None:
        message = b"Subject: x\r\nfrom: Sales\r\n <sales@example.com>\r\n\r\nx"
        self.assertEqual(senderDomain(message, ""), "example.com")

    def test_idnFromHeader(self) -> None:
        encoded = b"From: =?utf-8?q?M=C3=BCller?= <info@b\xc3\xbccher.de>\r\n\r\nx"
        self.assertEqual(senderDomain(encoded, ""), "xn--bcher-kva.de")

    def test_envelopeWhenNoFrom(self) -> None:
        self.assertEqual(senderDomain(b"Subject: x\r\n\r\n", "a@Bücher.DE"), "xn--bcher-kva.de")

    def test_envelopeWhenFromUnreadable(self) -> None:
        self.assertEqual(senderDomain(b"From: nobody\r\n\r\n", "a@example.net"), "example.net")
        self.assertEqual(
            senderDomain(b"From: a@one.example\r\nFrom: b@two.example\r\n\r\n", "a@example.net"),
            "example.net",
        )

    def test_none(self) -> None:
        self.assertIsNone(senderDomain(b"Subject: x\r\n\r\n", ""))
        self.assertIsNone(senderDomain(b"Subject: x\r\n\r\n", "InfoSMS"))
        self.assertIsNone(senderDomain(b"From: a@[192.0.2.1]\r\n\r\n", "b@[192.0.2.2]"))


class QuickLookTests(SynchronousTestCase):
    """The quick look that skips the parse says "nothing to do" only where the parse would
    change nothing: every combination of the fields that matter, each way of writing them."""

    FIELDS = (
        b"X-IB-Bulk-Id: b1\r\n",
        b"x-ib-notify-url: https://h.example/\r\n\t/more\r\n",
        b"Message-ID: <m@example.com>\r\n",
        b"message-id:   \r\n",
        b"Message-ID:\r\n <folded@example.com>\r\n",
        b"Date: Fri, 07 Mar 2025 10:00:00 +0100\r\n",
        b"Subject: about x-ib-options\r\n",
        b"Subject: s\r\n date: not a field\r\n",
        b"From: a@example.com\r\n",
    )

    def test_sameAsTheParse(self) -> None:
        from itertools import combinations

        from mailrelay.message import outbound

        quickLook = outbound._nothingToDo
        self.patch(outbound, "_nothingToDo", lambda block: False)  # prepare() parses
        quick = 0
        for size in range(len(self.FIELDS) + 1):
            for fields in combinations(self.FIELDS, size):
                for lineEnd in (b"\r\n", b"\n"):
                    header = b"".join(fields).replace(b"\r\n", lineEnd)
                    message = header + lineEnd + b"body" + lineEnd
                    if quickLook(splitMessage(message)[0]):
                        quick += 1
                        self.assertEqual(prepare(message), message, message)
        self.assertGreaterEqual(quick, 4)  # the quick look does say yes, where it may
