"""Envelope sender and From: header: registered addresses, domains and SMS sender ids."""

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.model import Sender
from mailrelay.policy.addresses import parseMailbox
from mailrelay.policy.senders import (
    EnvelopeSender,
    RegisteredSenders,
    SenderIdError,
    checkEnvelopeSender,
    checkHeaderSenders,
    normaliseSenderId,
)
from mailrelay.smtp.replies import BAD_SENDER_SYNTAX, SENDER_NOT_ALLOWED
from tests.test_policy_support import SENDERS, RefusalMixin, account

SMS_ACCOUNT = account(sms_enabled=True)
MAIL_ACCOUNT = account()


class EnvelopeSenderTests(RefusalMixin, SynchronousTestCase):
    def test_registeredDomain(self) -> None:
        self.assertEqual(
            checkEnvelopeSender("News@EXAMPLE.com", MAIL_ACCOUNT, SENDERS),
            EnvelopeSender("News@example.com", "address"),
        )

    def test_registeredIdnDomain(self) -> None:
        sender = checkEnvelopeSender("info@xn--bcher-kva.de", MAIL_ACCOUNT, SENDERS)
        self.assertEqual(sender.value, "info@xn--bcher-kva.de")
        checkEnvelopeSender("info@BÜCHER.de", MAIL_ACCOUNT, SENDERS)

    def test_subdomainNotAllowed(self) -> None:
        e = self.assertRefused(
            SENDER_NOT_ALLOWED, checkEnvelopeSender, "a@news.example.com", MAIL_ACCOUNT, SENDERS
        )
        self.assertIn("a@news.example.com", e.reply.text)

    def test_registeredAddress(self) -> None:
        checkEnvelopeSender("alerts@Example.NET", MAIL_ACCOUNT, SENDERS)
        self.assertRefused(
            SENDER_NOT_ALLOWED, checkEnvelopeSender, "other@example.net", MAIL_ACCOUNT, SENDERS
        )

    def test_localPartIsExact(self) -> None:
        self.assertRefused(
            SENDER_NOT_ALLOWED, checkEnvelopeSender, "Alerts@example.net", MAIL_ACCOUNT, SENDERS
        )

    def test_otherAccountsSendersDoNotCount(self) -> None:
        self.assertRefused(
            SENDER_NOT_ALLOWED, checkEnvelopeSender, "a@other.example", MAIL_ACCOUNT, SENDERS
        )

    def test_nullSenderRefused(self) -> None:
        self.assertRefused(SENDER_NOT_ALLOWED, checkEnvelopeSender, "", MAIL_ACCOUNT, SENDERS)

    def test_badSyntax(self) -> None:
        self.assertRefused(
            BAD_SENDER_SYNTAX, checkEnvelopeSender, "a..b@example.com", MAIL_ACCOUNT, SENDERS
        )
        self.assertRefused(
            BAD_SENDER_SYNTAX, checkEnvelopeSender, "not an id!", SMS_ACCOUNT, SENDERS
        )

    def test_smsGatewaySenderId(self) -> None:
        """``MAIL FROM: +393331234567`` registered as an sms sender."""
        self.assertEqual(
            checkEnvelopeSender("+393331234567", SMS_ACCOUNT, SENDERS),
            EnvelopeSender("+393331234567", "sms"),
        )
        self.assertEqual(
            checkEnvelopeSender("00393331234567", SMS_ACCOUNT, SENDERS).value, "+393331234567"
        )

    def test_alphanumericSenderId(self) -> None:
        self.assertEqual(
            checkEnvelopeSender("ACME", SMS_ACCOUNT, SENDERS), EnvelopeSender("ACME", "sms")
        )
        self.assertRefused(SENDER_NOT_ALLOWED, checkEnvelopeSender, "Acme", SMS_ACCOUNT, SENDERS)

    def test_unregisteredSenderId(self) -> None:
        self.assertRefused(
            SENDER_NOT_ALLOWED, checkEnvelopeSender, "+393330000000", SMS_ACCOUNT, SENDERS
        )

    def test_senderIdNeedsSms(self) -> None:
        e = self.assertRefused(
            SENDER_NOT_ALLOWED, checkEnvelopeSender, "+393331234567", MAIL_ACCOUNT, SENDERS
        )
        self.assertIn("SMS", e.reply.text)

    def test_unreadableRegistrationAllowsNothing(self) -> None:
        senders = (Sender("acme", "not a domain", "domain"), Sender("acme", "x@", "address"))
        self.assertRefused(
            SENDER_NOT_ALLOWED, checkEnvelopeSender, "a@example.com", MAIL_ACCOUNT, senders
        )


class SenderIdTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(normaliseSenderId("393331234567"), "+393331234567")
        self.assertEqual(normaliseSenderId("12345"), "12345")
        self.assertEqual(normaliseSenderId("+" + "1" * 16), "+" + "1" * 16)
        self.assertEqual(normaliseSenderId("Acme2024"), "Acme2024")
        self.assertEqual(normaliseSenderId("A" * 11), "A" * 11)

    def test_tooLong(self) -> None:
        self.assertRaises(SenderIdError, normaliseSenderId, "1" * 17)
        self.assertRaises(SenderIdError, normaliseSenderId, "A" * 12)

    def test_badCharacters(self) -> None:
        for text in ("", "ACME CORP", "acme!", "+ACME", "Ünicode"):
            self.assertRaises(SenderIdError, normaliseSenderId, text)


class HeaderSenderTests(RefusalMixin, SynchronousTestCase):
    def test_registered(self) -> None:
        checkHeaderSenders([parseMailbox("jo@example.com")], MAIL_ACCOUNT, SENDERS)

    def test_notRegistered(self) -> None:
        e = self.assertRefused(
            SENDER_NOT_ALLOWED,
            checkHeaderSenders,
            [parseMailbox("jo@example.com"), parseMailbox("eve@evil.example")],
            MAIL_ACCOUNT,
            SENDERS,
        )
        self.assertIn("From:", e.reply.text)
        self.assertIn("eve@evil.example", e.reply.text)


class RegisteredSendersTests(RefusalMixin, SynchronousTestCase):
    """The senders a session reads once and keeps for its messages."""

    def test_readInNormalForm(self) -> None:
        registered = RegisteredSenders.of(
            "acme", [*SENDERS, Sender("acme", "not an address@", "address")]
        )
        self.assertEqual(registered.addresses, {parseMailbox("alerts@example.net")})
        self.assertEqual(registered.domains, {"example.com", "xn--bcher-kva.de"})
        self.assertEqual(registered.smsIds, {"+393331234567", "ACME"})
        self.assertEqual(list(registered), [*SENDERS, Sender("acme", "not an address@", "address")])

    def test_sameAnswersAsTheSenders(self) -> None:
        registered = RegisteredSenders.of("acme", SENDERS)
        self.assertEqual(
            checkEnvelopeSender("News@EXAMPLE.com", MAIL_ACCOUNT, registered),
            checkEnvelopeSender("News@EXAMPLE.com", MAIL_ACCOUNT, SENDERS),
        )
        self.assertEqual(
            checkEnvelopeSender("393331234567", SMS_ACCOUNT, registered),
            EnvelopeSender("+393331234567", "sms"),
        )
        checkHeaderSenders([parseMailbox("jo@example.com")], MAIL_ACCOUNT, registered)
        self.assertRefused(
            SENDER_NOT_ALLOWED,
            checkHeaderSenders,
            [parseMailbox("jo@other.example")],
            MAIL_ACCOUNT,
            registered,
        )

    def test_anotherAccountsRegistryAllowsOnlyWhatIsThisAccounts(self) -> None:
        """Handed the registry of another account, a check reads the senders again for the
        account it checks: the other account's domains allow nothing."""
        others = RegisteredSenders.of("other", SENDERS)
        self.assertRefused(
            SENDER_NOT_ALLOWED,
            checkEnvelopeSender,
            "jo@other.example",
            MAIL_ACCOUNT,
            others,
        )
        checkEnvelopeSender("jo@example.com", MAIL_ACCOUNT, others)
