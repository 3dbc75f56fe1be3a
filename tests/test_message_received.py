"""The Received: trace header."""

from datetime import UTC, datetime

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.message.received import receivedHeader
from mailrelay.model import Recipient

NOW = datetime(2025, 3, 8, 14, 58, 30, tzinfo=UTC)


def unfold(header: bytes) -> str:
    return header.decode("ascii").replace("\r\n\t", " ")


def headerFor(recipients: list[Recipient]) -> bytes:
    """The Received: field of an authenticated plain session's message to ``recipients``."""
    return receivedHeader(
        hostname="h.example",
        helo="c",
        clientAddress="192.0.2.1",
        tlsInfo=None,
        authenticated=True,
        notificationId="1",
        recipients=recipients,
        now=NOW,
    )


class ReceivedTests(SynchronousTestCase):
    def test_authenticatedTls(self) -> None:
        header = receivedHeader(
            hostname="relay.example.com",
            helo="client.example",
            clientAddress="192.0.2.7",
            reverseName="mx.client.example",
            tlsInfo="TLSv1.3 TLS_AES_256_GCM_SHA384",
            authenticated=True,
            notificationId="100000009020772",
            recipients=[Recipient("bob@example.org", "email")],
            now=NOW,
        )
        self.assertTrue(header.endswith(b"\r\n"))
        self.assertEqual(
            unfold(header),
            "Received: from client.example (mx.client.example [192.0.2.7]) "
            "by relay.example.com with ESMTPSA (using TLSv1.3 TLS_AES_256_GCM_SHA384) "
            "id 100000009020772 for <bob@example.org>; Sat, 08 Mar 2025 14:58:30 +0000\r\n",
        )
        for line in header.split(b"\r\n"):
            self.assertLessEqual(len(line), 78)

    def test_protocols(self) -> None:
        def protocol(tls: str | None, authenticated: bool) -> str:
            header = receivedHeader(
                hostname="h.example",
                helo="c",
                clientAddress="2001:db8::1",
                tlsInfo=tls,
                authenticated=authenticated,
                notificationId="1",
                now=NOW,
            )
            self.assertIn("([IPv6:2001:db8::1])", unfold(header))
            return unfold(header).split(" with ")[1].split()[0]

        self.assertEqual(protocol(None, False), "ESMTP")
        self.assertEqual(protocol(None, True), "ESMTPA")
        self.assertEqual(protocol("TLSv1.2", False), "ESMTPS")
        self.assertEqual(protocol("TLSv1.2", True), "ESMTPSA")

    def test_forOnlyWithOneRecipient(self) -> None:
        two = [Recipient("a@example.org", "email"), Recipient("b@example.org", "email")]
        self.assertNotIn(b"for <", headerFor(two))

    def test_forClauseHasNoControlCharacters(self) -> None:
        """Whatever let one through the address checks, no control character reaches the
        header; UTF-8 (an SMTPUTF8 address) does."""
        header = headerFor([Recipient("jörg\x1b[31m\x0b@example.org", "email")])
        self.assertIn("for <jörg?[31m?@example.org>;".encode(), header)

    def test_clientTextCannotInjectHeaders(self) -> None:
        header = receivedHeader(
            hostname="h.example",
            helo="evil\r\nBcc: victim@example.org (x)",
            clientAddress="192.0.2.1",
            reverseName="rev\nX: y",
            tlsInfo="TLS\r\nX: z",
            authenticated=False,
            notificationId="1",
            now=NOW,
        )
        lines = header.split(b"\r\n")
        self.assertTrue(all(line.startswith((b"Received:", b"\t")) for line in lines[:-1]))
        self.assertEqual(lines[-1], b"")
        self.assertNotIn(b"\n", b"".join(lines))
