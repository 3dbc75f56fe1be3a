"""
The SMPP gateway against the SMSC simulator on loopback: bind, submit_sm (single and
concatenated, GSM-7 and UCS-2), a window of outstanding submits, ESME_RTHROTTLED backed off,
a dropped connection reconnected, deliver_sm receipts into the trail.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.trial.unittest import TestCase

from mailrelay.delivery.sms.gateway import SmsMessage
from mailrelay.delivery.sms.receipts import Receipt
from mailrelay.delivery.sms.smpp import SMPPGateway, SMPPSettings
from mailrelay.model import Recipient
from tests.smsc_simulator import PASSWORD, SMSC, SYSTEM_ID, startSmsc, waitUntil

TO = Recipient("+4477331234567", "sms")


def message(text: str, reference: int = 1) -> SmsMessage:
    return SmsMessage("100", TO, "+393331234567", text, reference)


class SMPPGatewayTests(TestCase):
    timeout = 30

    async def gateway(self, smsc: SMSC, **settings: object) -> tuple[SMPPGateway, list[Receipt]]:
        receipts: list[Receipt] = []
        gateway = SMPPGateway(
            SMPPSettings(
                "127.0.0.1",
                smsc.port.getHost().port,
                SYSTEM_ID,
                PASSWORD,
                throttleBackoff=0.05,
                **settings,  # type: ignore[arg-type]
            ),
            reactor,
            receipts.append,
        )
        gateway.startService()
        self.addCleanup(gateway.stopService)
        return gateway, receipts

    async def test_submitAndReceipt(self) -> None:
        smsc = await startSmsc(self)
        gateway, receipts = await self.gateway(smsc)
        submission = await gateway.submit(message("Test SMS message via SMTP"))
        self.assertEqual(submission.kind, "delivered")
        self.assertEqual(submission.messageIds, ("m1",))
        (sent,) = smsc.submitted
        m = sent.message
        self.assertEqual(
            (m.source, m.sourceTon, m.destination, m.destTon),
            ("393331234567", 1, "4477331234567", 1),
        )
        self.assertEqual((m.esmClass, m.dataCoding, m.registeredDelivery), (0, 0, 1))
        self.assertEqual(sent.text, "Test SMS message via SMTP")
        smsc.sendReceipt("m1", "DELIVRD")
        smsc.sendReceipt("m1", "UNDELIV", tlvs=True)
        await waitUntil(lambda: len(receipts) == 2)
        self.assertEqual(
            [(r.messageId, r.state) for r in receipts], [("m1", "DELIVRD"), ("m1", "UNDELIV")]
        )

    async def test_concatenated(self) -> None:
        smsc = await startSmsc(self)
        gateway, _ = await self.gateway(smsc)
        gsm = "".join(chr(ord("a") + i % 26) for i in range(300))
        unicode = "ж" * 71
        first = await gateway.submit(message(gsm, 5))
        second = await gateway.submit(message(unicode, 6))
        self.assertEqual((len(first.messageIds), len(second.messageIds)), (2, 2))
        self.assertEqual([s.message.esmClass for s in smsc.submitted], [0x40] * 4)
        self.assertEqual([s.message.dataCoding for s in smsc.submitted], [0, 0, 8, 8])
        self.assertEqual(smsc.texts(), [gsm, unicode])

    async def test_wrongPasswordDefers(self) -> None:
        smsc = await startSmsc(self)
        smsc.password = "other"
        gateway, _ = await self.gateway(smsc, bindRetryDelay=0.1)
        submission = await gateway.submit(message("hi"))
        self.assertEqual(submission.kind, "deferred")
        self.assertEqual(smsc.submitted, [])

    async def test_throttledBackedOff(self) -> None:
        smsc = await startSmsc(self)
        gateway, _ = await self.gateway(smsc)
        smsc.throttleNext = 3
        started = reactor.seconds()
        submission = await gateway.submit(message("hi"))
        self.assertEqual(submission.kind, "delivered")
        self.assertEqual(smsc.throttledAnswers, 3)
        # 0.05 + 0.1 + 0.2 s of pauses at least
        self.assertGreater(reactor.seconds() - started, 0.3)

    async def test_throttledTooLongDefers(self) -> None:
        smsc = await startSmsc(self)
        gateway, _ = await self.gateway(smsc, throttleRetries=1)
        smsc.throttleNext = 5
        submission = await gateway.submit(message("hi"))
        self.assertEqual(submission.kind, "deferred")
        self.assertIn("0x58", submission.reply)

    async def test_refusedIsFinal(self) -> None:
        smsc = await startSmsc(self)
        gateway, _ = await self.gateway(smsc)
        smsc.refuseWith = 0x0B  # ESME_RINVDSTADR
        submission = await gateway.submit(message("hi"))
        self.assertEqual(submission.kind, "failed")

    async def test_droppedConnectionDefersThenReconnects(self) -> None:
        smsc = await startSmsc(self)
        gateway, _ = await self.gateway(smsc)
        smsc.dropNext = 1
        submission = await gateway.submit(message("hi"))
        self.assertEqual(submission.kind, "deferred")
        again = await gateway.submit(message("hi again"))
        self.assertEqual(again.kind, "delivered")
        self.assertEqual(smsc.binds, 2)

    async def test_window(self) -> None:
        """At most ``window`` submit_sm are outstanding; the rest wait their turn."""
        smsc = await startSmsc(self)
        gateway, _ = await self.gateway(smsc, window=3)
        inFlight = [0]
        most = [0]
        original = smsc.buildProtocol

        def slow(addr: object) -> object:
            protocol = original(addr)
            submit = protocol._submit

            def answerLater(packet: object) -> None:
                inFlight[0] += 1
                most[0] = max(most[0], inFlight[0])

                def answer() -> None:
                    inFlight[0] -= 1
                    submit(packet)

                reactor.callLater(0.02, answer)

            protocol._submit = answerLater  # type: ignore[method-assign]
            return protocol

        smsc.buildProtocol = slow  # type: ignore[method-assign]
        results = await DeferredList([gateway.submit(message(f"n{i}")) for i in range(10)])
        self.assertEqual([s.reply for _, s in results if s.kind != "delivered"], [])
        self.assertEqual(len(smsc.submitted), 10)
        self.assertEqual(most[0], 3)

    async def test_enquireLink(self) -> None:
        smsc = await startSmsc(self)
        gateway, _ = await self.gateway(smsc, enquireLinkInterval=0.05)
        await gateway.whenBound()
        await waitUntil(lambda: smsc.received.count(0x15) >= 2)
