"""E-mail address syntax and normal form."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.policy.addresses import (
    AddressSyntaxError,
    Mailbox,
    mailboxFromParts,
    normaliseDomain,
    parseMailbox,
    recipientAddress,
    senderAddress,
)
from mailrelay.smtp.replies import BAD_RECIPIENT_SYNTAX, BAD_SENDER_SYNTAX
from tests.test_policy_support import RefusalMixin


class NormalFormTests(SynchronousTestCase):
    def test_dotAtom(self) -> None:
        self.assertEqual(
            parseMailbox("John.Smith@Example.COM"), Mailbox("John.Smith", "example.com")
        )

    def test_quotedLocalPartUnquotedWhenPossible(self) -> None:
        self.assertEqual(str(parseMailbox('"john.smith"@example.com')), "john.smith@example.com")

    def test_quotedLocalPartKept(self) -> None:
        self.assertEqual(str(parseMailbox('"john smith"@example.com')), '"john smith"@example.com')
        self.assertEqual(str(parseMailbox('"a@b"@example.com')), '"a@b"@example.com')
        self.assertEqual(str(parseMailbox('"a\\"b"@example.com')), '"a\\"b"@example.com')
        # A needless quoted-pair is dropped.
        self.assertEqual(str(parseMailbox('"a\\b"@example.com')), "ab@example.com")

    def test_idnDomainBecomesALabel(self) -> None:
        self.assertEqual(str(parseMailbox("info@Bücher.DE")), "info@xn--bcher-kva.de")
        self.assertEqual(parseMailbox("info@xn--bcher-kva.de"), parseMailbox("info@bücher.de"))

    def test_utf8LocalPart(self) -> None:
        mailbox = parseMailbox("jörg@bücher.de")
        self.assertEqual(mailbox.local, "jörg")
        self.assertFalse(mailbox.isAscii)

    def test_addressLiterals(self) -> None:
        self.assertEqual(str(parseMailbox("u@[192.0.2.1]")), "u@[192.0.2.1]")
        self.assertEqual(str(parseMailbox("u@[ipv6:2001:DB8:0::1]")), "u@[IPv6:2001:db8::1]")

    def test_fromParts(self) -> None:
        self.assertEqual(
            str(mailboxFromParts("john smith", "Example.com")), '"john smith"@example.com'
        )
        self.assertEqual(str(mailboxFromParts("john", "example.com")), "john@example.com")


class InvalidTests(SynchronousTestCase):
    def assertInvalid(self, text: str) -> None:
        self.assertRaises(AddressSyntaxError, parseMailbox, text)

    def test_misplacedDots(self) -> None:
        for text in ("a..b@example.com", ".a@example.com", "a.@example.com"):
            self.assertInvalid(text)

    def test_noDomain(self) -> None:
        for text in ("alice", "alice@", "@example.com", '""@example.com'):
            self.assertInvalid(text)

    def test_domainNotFullyQualified(self) -> None:
        self.assertInvalid("root@localhost")

    def test_bareIp(self) -> None:
        self.assertInvalid("u@192.0.2.1")

    def test_badLabels(self) -> None:
        for text in (
            "u@-x.com",
            "u@x-.com",
            "u@x_y.com",
            "u@a..b.com",
            "u@b.com.",
            "u@xn--zz-.com",
        ):
            self.assertInvalid(text)

    def test_badLiteral(self) -> None:
        for text in (
            "u@[300.1.1.1]",
            "u@[IPv6:zz::1]",
            "u@[tag:stuff]",
            "u@[1.2.3.4",
            # A scope id: ipaddress takes any text after the %, control characters included.
            "u@[IPv6:fe80::1%eth0]",
            "u@[IPv6:fe80::1%\x1b[31m\x0b(bar)\x7f]",
        ):
            self.assertInvalid(text)

    def test_unquotedSpecials(self) -> None:
        for text in ("a b@example.com", "a,b@example.com", 'a"b@example.com', "a@b@example.com"):
            self.assertInvalid(text)

    def test_controlCharacterInQuotes(self) -> None:
        self.assertInvalid('"a\x01"@example.com')
        self.assertRaises(AddressSyntaxError, mailboxFromParts, "a\x00b", "example.com")

    def test_localPartLength(self) -> None:
        parseMailbox("a" * 64 + "@example.com")
        self.assertInvalid("a" * 65 + "@example.com")

    def test_addressLength(self) -> None:
        labels = ".".join(["d" * 60] * 3)  # 182 characters
        self.assertEqual(len(str(parseMailbox("a" * 64 + "@" + labels + ".abcdef"))), 254)
        self.assertInvalid("a" * 64 + "@" + labels + ".abcdefg")

    def test_labelLength(self) -> None:
        normaliseDomain("a" * 63 + ".com")
        self.assertRaises(AddressSyntaxError, normaliseDomain, "a" * 64 + ".com")


class RefusalTests(RefusalMixin, SynchronousTestCase):
    def test_recipientSyntax(self) -> None:
        e = self.assertRefused(BAD_RECIPIENT_SYNTAX, recipientAddress, "a..b@example.com")
        self.assertIn("dot", e.reply.text)

    def test_senderSyntax(self) -> None:
        self.assertRefused(BAD_SENDER_SYNTAX, senderAddress, "nobody@localhost")

    def test_utf8LocalPartNeedsSmtputf8(self) -> None:
        e = self.assertRefused(BAD_RECIPIENT_SYNTAX, recipientAddress, "jörg@example.com")
        self.assertIn("SMTPUTF8", e.reply.text)
        self.assertEqual(recipientAddress("jörg@example.com", smtputf8=True).local, "jörg")

    def test_idnDomainNeedsNoSmtputf8(self) -> None:
        self.assertEqual(str(recipientAddress("info@bücher.de")), "info@xn--bcher-kva.de")


class FuzzTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=80))
    def test_onlyAddressSyntaxError(self, text: str) -> None:
        try:
            mailbox = parseMailbox(text)
        except AddressSyntaxError:
            return
        # A normal form is its own normal form.
        self.assertEqual(parseMailbox(str(mailbox)), mailbox)
