"""SMS length: GSM-7 and UCS-2 segments, and the account's segment limit."""

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.policy.sms import checkSmsText, measureSms
from mailrelay.smtp.replies import CONTENT_REFUSED
from tests.test_policy_support import RefusalMixin


class MeasureTests(SynchronousTestCase):
    def test_gsmBasic(self) -> None:
        length = measureSms("Hello @ £5, ça va? Ünïcode-free")
        self.assertEqual(length.encoding, "UCS-2")  # "ç" and "ï" are not GSM 03.38
        length = measureSms("Hello @ £5, Ça va? Ñ")
        self.assertEqual((length.encoding, length.units, length.segments), ("GSM-7", 20, 1))

    def test_extensionCharactersCostTwo(self) -> None:
        length = measureSms("€[]{}^~\\|")
        self.assertEqual((length.encoding, length.units), ("GSM-7", 18))

    def test_160Is1Segment161Is2(self) -> None:
        self.assertEqual(measureSms("a" * 160).segments, 1)
        self.assertEqual(measureSms("a" * 161).segments, 2)
        self.assertEqual(measureSms("a" * 306).segments, 2)
        self.assertEqual(measureSms("a" * 307).segments, 3)

    def test_escapePairNotSplit(self) -> None:
        # 152 septets then "€": the pair does not fit in segment one's last septet.
        self.assertEqual(measureSms("a" * 152 + "€" + "a" * 152).segments, 3)
        self.assertEqual(measureSms("a" * 151 + "€" + "a" * 153).segments, 2)

    def test_ucs2(self) -> None:
        length = measureSms("ж" * 70)
        self.assertEqual((length.encoding, length.units, length.segments), ("UCS-2", 70, 1))
        self.assertEqual(measureSms("ж" * 71).segments, 2)
        self.assertEqual(measureSms("ж" * 134).segments, 2)
        self.assertEqual(measureSms("ж" * 135).segments, 3)

    def test_astralCharactersAreTwoCodeUnits(self) -> None:
        length = measureSms("😀" * 35)
        self.assertEqual((length.units, length.segments), (70, 1))
        self.assertEqual(measureSms("😀" * 36).segments, 2)
        # 66 units then a pair: the pair goes to segment two whole.
        self.assertEqual(measureSms("ж" * 66 + "😀" + "ж" * 66).segments, 3)

    def test_empty(self) -> None:
        self.assertEqual(measureSms("").segments, 1)


class LimitTests(RefusalMixin, SynchronousTestCase):
    def test_160GsmAccepted(self) -> None:
        self.assertEqual(checkSmsText("a" * 160, 1).segments, 1)

    def test_161GsmRefusedAtLimit1(self) -> None:
        e = self.assertRefused(CONTENT_REFUSED, checkSmsText, "a" * 161, 1)
        self.assertIn("161", e.reply.text)
        self.assertIn("2 segments", e.reply.text)

    def test_161GsmAcceptedAtLimit2(self) -> None:
        self.assertEqual(checkSmsText("a" * 161, 2).segments, 2)

    def test_70Ucs2AcceptedAnd71Refused(self) -> None:
        self.assertEqual(checkSmsText("ж" * 70, 1).encoding, "UCS-2")
        e = self.assertRefused(CONTENT_REFUSED, checkSmsText, "ж" * 71, 1)
        self.assertIn("UCS-2", e.reply.text)
