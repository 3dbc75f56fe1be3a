"""Segmentation per GSM 03.38 / 23.040, and the SMPP PDU codec (checked against smpplib's)."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from mailrelay.delivery.sms import pdu
from mailrelay.delivery.sms.receipts import parseSmppReceipt
from mailrelay.delivery.sms.segments import TooManyParts, readPart, splitText
from mailrelay.policy.sms import measureSms


def reassemble(text: str) -> str:
    segments = splitText(text, 42)
    return "".join(readPart(p, segments.esmClass, segments.dataCoding).text for p in segments.parts)


class SegmentTests(TestCase):
    def test_singleGsm(self) -> None:
        segments = splitText("a" * 160, 1)
        self.assertEqual(
            (segments.encoding, segments.dataCoding, segments.esmClass), ("GSM-7", 0, 0)
        )
        self.assertEqual(segments.parts, (b"a" * 160,))

    def test_extensionCostsTwo(self) -> None:
        self.assertEqual(splitText("€" * 80, 1).parts, (b"\x1be" * 80,))
        self.assertEqual(len(splitText("€" * 81, 1).parts), 2)

    def test_gsm300IsTwoParts(self) -> None:
        text = "".join(chr(ord("a") + i % 26) for i in range(300))
        segments = splitText(text, 7)
        self.assertEqual(len(segments.parts), 2)
        self.assertEqual(segments.esmClass, 0x40)
        self.assertEqual(segments.parts[0][:6], bytes((5, 0, 3, 7, 2, 1)))
        self.assertEqual(segments.parts[1][:6], bytes((5, 0, 3, 7, 2, 2)))
        self.assertEqual(len(segments.parts[0]), 6 + 153)
        self.assertEqual(reassemble(text), text)

    def test_escapeNeverSplit(self) -> None:
        text = "a" * 152 + "€" + "b" * 10
        segments = splitText(text, 1)
        self.assertEqual(len(segments.parts[0]), 6 + 152)
        self.assertTrue(segments.parts[1][6:].startswith(b"\x1be"))
        self.assertEqual(reassemble(text), text)

    def test_unicode71IsTwoUcs2Parts(self) -> None:
        text = "ж" * 71
        segments = splitText(text, 3)
        self.assertEqual((segments.encoding, segments.dataCoding), ("UCS-2", 8))
        self.assertEqual([len(p) for p in segments.parts], [6 + 134, 6 + 8])
        self.assertEqual(reassemble(text), text)

    def test_surrogateNeverSplit(self) -> None:
        text = "x" * 66 + "😀" + "y" * 10
        segments = splitText(text, 3)
        self.assertEqual(len(segments.parts[0]), 6 + 132)
        self.assertEqual(reassemble(text), text)

    def test_countAgreesWithIntakeMeasure(self) -> None:
        for text in ["a" * n for n in (1, 160, 161, 306, 307, 459)] + [
            "€" * 77 + "a" * 100,
            "ж" * 67 * 3,
            "😀" * 40,
            "a" * 200 + "😀",
        ]:
            self.assertEqual(len(splitText(text, 1).parts), measureSms(text).segments, text[:10])
            self.assertEqual(reassemble(text), text)

    def test_tooManyParts(self) -> None:
        self.assertRaises(TooManyParts, splitText, "a" * 153 * 256, 1)


class PDUTests(TestCase):
    def test_submitSmRoundTrip(self) -> None:
        fields = pdu.ShortMessage(
            "393331234567", "4477331234567", b"\x05\x00\x03\x01\x02\x01hi", 0x40, 8, 1, 1, 1
        )
        packet = pdu.PDU(pdu.SUBMIT_SM, 7, body=fields.body())
        decoded = pdu.decode(packet.encode())
        self.assertEqual(decoded, packet)
        self.assertEqual(pdu.readShortMessage(decoded.body), fields)

    def test_againstSmpplib(self) -> None:
        """The octets our codec writes are what an independent codec reads (when installed)."""
        try:
            import smpplib.smpp
        except ImportError:
            raise self.skipTest("smpplib not installed") from None
        fields = pdu.ShortMessage(
            "393331234567", "4477331234567", b"\x05\x00\x03\x01\x02\x01hi", 0x40, 8, 1, 1, 1
        )
        raw = pdu.PDU(pdu.SUBMIT_SM, 7, body=fields.body()).encode()

        class Client:
            sequence = 0

            def next_sequence(self) -> int:
                return 1

        parsed = smpplib.smpp.parse_pdu(raw, client=Client())
        self.assertEqual(parsed.command, "submit_sm")
        self.assertEqual(parsed.sequence, 7)
        self.assertEqual(parsed.destination_addr, b"4477331234567")
        self.assertEqual(
            (parsed.esm_class, parsed.data_coding, parsed.registered_delivery), (0x40, 8, 1)
        )
        self.assertEqual(parsed.short_message, fields.shortMessage)
        bind = smpplib.smpp.parse_pdu(
            pdu.bindTransceiver(3, "relay", "pw").encode(), client=Client()
        )
        self.assertEqual(
            (bind.command, bind.system_id, bind.password), ("bind_transceiver", b"relay", b"pw")
        )

    def test_badLength(self) -> None:
        self.assertRaises(pdu.PDUError, pdu.decodeHeader, b"\x00\x00\x00\x05" + b"\x00" * 12)

    def test_addresses(self) -> None:
        self.assertEqual(pdu.address("+4477331234567"), (1, 1, "4477331234567"))
        self.assertEqual(pdu.address("ACME"), (5, 0, "ACME"))


class ReceiptTextTests(TestCase):
    def test_text(self) -> None:
        receipt = parseSmppReceipt(
            "id:abc123 sub:001 dlvrd:001 submit date:2401011200 done date:2401011201 "
            "stat:DELIVRD err:000 text:Hello"
        )
        assert receipt is not None
        self.assertEqual(
            (receipt.messageId, receipt.state, receipt.delivered), ("abc123", "DELIVRD", True)
        )

    def test_tlvsWin(self) -> None:
        receipt = parseSmppReceipt("garbage", "x9", 5)
        assert receipt is not None
        self.assertEqual(
            (receipt.messageId, receipt.state, receipt.delivered), ("x9", "UNDELIV", False)
        )

    def test_unreadable(self) -> None:
        self.assertIsNone(parseSmppReceipt("hello there"))

    def test_intermediate(self) -> None:
        receipt = parseSmppReceipt("id:1 stat:ENROUTE")
        assert receipt is not None
        self.assertIsNone(receipt.delivered)
