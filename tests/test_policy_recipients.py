"""RCPT classification (e-mail or SMS) and the per-message recipient limit."""

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.model import Recipient
from mailrelay.policy.recipients import checkRecipientCount, classifyRecipient, recipientLimit
from mailrelay.policy.senders import EnvelopeSender
from mailrelay.smtp.replies import BAD_RECIPIENT_SYNTAX, NO_SUCH_RECIPIENT, TOO_MANY_RECIPIENTS
from tests.test_policy_support import RefusalMixin, account

SMS_ACCOUNT = account(sms_enabled=True)
MAIL_ACCOUNT = account()
SMS_DOMAINS = ("sms.example.com",)


class ClassifyTests(RefusalMixin, SynchronousTestCase):
    def test_email(self) -> None:
        self.assertEqual(
            classifyRecipient("Bob@Example.ORG", MAIL_ACCOUNT, SMS_DOMAINS),
            Recipient("Bob@example.org", "email"),
        )

    def test_quotedAndIdn(self) -> None:
        self.assertEqual(
            classifyRecipient('"bob smith"@bücher.de', MAIL_ACCOUNT),
            Recipient('"bob smith"@xn--bcher-kva.de', "email"),
        )

    def test_addressLiterals(self) -> None:
        """A public address literal is an address like any other; one inside a network
        (loopback, private, link-local, documentation) would let a client reach hosts that
        only the relay can, once it delivers by MX."""
        self.assertEqual(
            classifyRecipient("bob@[8.8.8.8]", MAIL_ACCOUNT),
            Recipient("bob@[8.8.8.8]", "email"),
        )
        self.assertEqual(
            classifyRecipient("bob@[IPv6:2606:4700::1111]", MAIL_ACCOUNT).channel, "email"
        )
        for text in (
            "bob@[127.0.0.1]",
            "bob@[10.1.2.3]",
            "bob@[169.254.169.254]",
            "bob@[192.0.2.1]",
            "bob@[IPv6:::1]",
            "bob@[IPv6:fe80::1]",
            "bob@[IPv6:::ffff:127.0.0.1]",
            "bob@[224.0.0.1]",  # multicast (which Python 3.11 counts as global)
            "bob@[IPv6:64:ff9b::7f00:1]",  # 127.0.0.1 through NAT64
            "bob@[IPv6:2002:7f00:1::]",  # 127.0.0.1 through 6to4
            "bob@[IPv6:::127.0.0.1]",  # IPv4-compatible
            "bob@[IPv6:fec0::1]",  # site-local
            "bob@[IPv6:ff02::1]",  # multicast
        ):
            e = self.assertRefused(NO_SUCH_RECIPIENT, classifyRecipient, text, MAIL_ACCOUNT)
            self.assertIn("is not relayed", e.reply.text)

    def test_smsGatewayRecipient(self) -> None:
        """``RCPT TO: +4477331234567`` on an SMS-enabled account."""
        self.assertEqual(
            classifyRecipient("+4477331234567", SMS_ACCOUNT, SMS_DOMAINS),
            Recipient("+4477331234567", "sms"),
        )

    def test_phoneForms(self) -> None:
        for text in ("004477331234567", "4477331234567", "4477331234567@sms.example.com"):
            self.assertEqual(
                classifyRecipient(text, SMS_ACCOUNT, SMS_DOMAINS),
                Recipient("+4477331234567", "sms"),
            )

    def test_phoneWithoutSms(self) -> None:
        self.assertRefused(NO_SUCH_RECIPIENT, classifyRecipient, "+4477331234567", MAIL_ACCOUNT)
        self.assertRefused(
            NO_SUCH_RECIPIENT,
            classifyRecipient,
            "+4477331234567@sms.example.com",
            MAIL_ACCOUNT,
            SMS_DOMAINS,
        )

    def test_syntax(self) -> None:
        for text in ("bob", "bob@", "a..b@example.com", "123", "bob@localhost"):
            self.assertRefused(
                BAD_RECIPIENT_SYNTAX, classifyRecipient, text, SMS_ACCOUNT, SMS_DOMAINS
            )

    def test_postmaster(self) -> None:
        self.assertRefused(NO_SUCH_RECIPIENT, classifyRecipient, "Postmaster", MAIL_ACCOUNT)

    def test_smsSenderIdCannotMail(self) -> None:
        sender = EnvelopeSender("+393331234567", "sms")
        self.assertRefused(
            NO_SUCH_RECIPIENT, classifyRecipient, "bob@example.org", SMS_ACCOUNT, sender=sender
        )
        self.assertEqual(
            classifyRecipient("+4477331234567", SMS_ACCOUNT, sender=sender).channel, "sms"
        )

    def test_utf8LocalPart(self) -> None:
        self.assertRefused(
            BAD_RECIPIENT_SYNTAX, classifyRecipient, "jörg@example.org", MAIL_ACCOUNT
        )
        self.assertEqual(
            classifyRecipient("jörg@example.org", MAIL_ACCOUNT, smtputf8=True).address,
            "jörg@example.org",
        )


class LimitTests(RefusalMixin, SynchronousTestCase):
    def test_limitIsTheSmaller(self) -> None:
        self.assertEqual(recipientLimit(account(), 1000), 1000)
        self.assertEqual(recipientLimit(account(max_recipients=5), 1000), 5)
        self.assertEqual(recipientLimit(account(max_recipients=5000), 1000), 1000)

    def test_tooMany(self) -> None:
        limited = account(max_recipients=2)
        checkRecipientCount(0, limited, 1000)
        checkRecipientCount(1, limited, 1000)
        e = self.assertRefused(TOO_MANY_RECIPIENTS, checkRecipientCount, 2, limited, 1000)
        self.assertIn("2", e.reply.text)

    def test_configLimit(self) -> None:
        self.assertRefused(TOO_MANY_RECIPIENTS, checkRecipientCount, 3, account(), 3)
