"""Phone numbers: the SPEC §5 forms, normalised to E.164."""

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.policy.phones import (
    PhoneNumberError,
    isSmsDomain,
    normalisePhoneNumber,
    phoneRecipient,
)
from mailrelay.smtp.replies import BAD_RECIPIENT_SYNTAX
from tests.test_policy_support import RefusalMixin

SMS_DOMAINS = ("sms.example.com",)


class NormaliseTests(SynchronousTestCase):
    def test_forms(self) -> None:
        for text in ("+4477331234567", "004477331234567", "4477331234567"):
            self.assertEqual(normalisePhoneNumber(text), "+4477331234567")

    def test_digitCount(self) -> None:
        self.assertEqual(normalisePhoneNumber("+1234567890"), "+1234567890")
        self.assertEqual(normalisePhoneNumber("+1" + "2" * 15), "+1" + "2" * 15)
        self.assertRaises(PhoneNumberError, normalisePhoneNumber, "+123456789")
        self.assertRaises(PhoneNumberError, normalisePhoneNumber, "+1" + "2" * 16)

    def test_nationalNumberRefused(self) -> None:
        e = self.assertRaises(PhoneNumberError, normalisePhoneNumber, "07733123456")
        self.assertIn("international", str(e))

    def test_notDigits(self) -> None:
        for text in ("+44 7733 123456", "+44-7733123456", "++447733123456", "+٤٤٧٧٣٣١٢٣٤٥٦٧"):
            self.assertRaises(PhoneNumberError, normalisePhoneNumber, text)


class RecipientTests(RefusalMixin, SynchronousTestCase):
    def test_bare(self) -> None:
        self.assertEqual(phoneRecipient("+4477331234567"), "+4477331234567")
        self.assertEqual(phoneRecipient("004477331234567"), "+4477331234567")

    def test_atSmsDomain(self) -> None:
        self.assertEqual(
            phoneRecipient("004477331234567@SMS.example.com", SMS_DOMAINS), "+4477331234567"
        )

    def test_emailIsNotAPhone(self) -> None:
        self.assertIsNone(phoneRecipient("alice@example.com", SMS_DOMAINS))
        self.assertIsNone(phoneRecipient("+4477331234567@example.com", SMS_DOMAINS))
        self.assertIsNone(phoneRecipient("alice", SMS_DOMAINS))

    def test_badNumberRefused(self) -> None:
        self.assertRefused(BAD_RECIPIENT_SYNTAX, phoneRecipient, "12345")
        self.assertRefused(
            BAD_RECIPIENT_SYNTAX, phoneRecipient, "alice@sms.example.com", SMS_DOMAINS
        )

    def test_smsDomainComparedInNormalForm(self) -> None:
        self.assertTrue(isSmsDomain("xn--bcher-kva.de", ("Bücher.de",)))
        self.assertFalse(isSmsDomain("sub.sms.example.com", SMS_DOMAINS))
