"""
The SMS channel through the whole relay: SMS-over-SMTP as gateway documents write it, over a
raw socket (with STARTTLS and AUTH, and without TLS on a relay-by-IP listener), to the SMSC
simulator over SMPP, the receipt back into the trail.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailrelay.interfaces import AlreadyExists
from mailrelay.model import Sender
from tests.relay_fixture import (
    ACCOUNT,
    PASSWORD,
    RelayFiles,
    RunningRelay,
    WireClient,
    startRelay,
)
from tests.smsc_simulator import PASSWORD as SMSC_PASSWORD
from tests.smsc_simulator import SMSC, SYSTEM_ID, startSmsc, waitUntil
from tests.test_delivery_e2e import smarthostConfig, trailOf
from tests.test_integration import acceptedId

SENDER_NUMBER = "+393331234567"
TO = "+4477331234567"


def smsConfig(smsc: SMSC) -> str:
    port = smsc.port.getHost().port
    # The smarthost is never used: these messages have no e-mail recipient.
    return smarthostConfig(1) + (
        f'\n[sms]\ngateway = "smpp://{SYSTEM_ID}:{SMSC_PASSWORD}@127.0.0.1:{port}"\n'
    )


def session(
    port: int, data: bytes, context: ssl.SSLContext | None, login: bool = True
) -> list[str]:
    """Blocking: the issue's exchange, as written there; every reply's first line."""
    answers = []
    with WireClient(port) as client:
        answers.append(client.reply().text)
        answers.append(client.command("EHLO client").text)
        if context is not None:
            answers.append(client.command("STARTTLS").text)
            client.startTLS(context)
            answers.append(client.command("EHLO client").text)
        if login:
            answers.append(client.login(ACCOUNT, PASSWORD).text)
        for line in (f"Mail From: {SENDER_NUMBER}", f"Rcpt To:{TO}", "Data"):
            reply = client.command(line)
            answers.append(f"{reply.code} {reply.text}")
        client.send(data + b".\r\n")
        reply = client.reply()
        answers.append(f"{reply.code} {reply.enhanced} {reply.text}")
        client.command("QUIT")
    return answers


async def sentAndReceipted(test: TestCase, relay: RunningRelay, smsc: SMSC, answer: str) -> str:
    """The accepted message's id, once the simulator got it and its receipt is in the trail."""
    test.assertTrue(answer.startswith("250 2.0.0"), answer)
    nid = acceptedId(answer.split(" ", 2)[2])
    await waitUntil(lambda: len(smsc.submitted) >= 1, 20)
    await waitForCode(relay, nid, "CH_RECEIVED")
    for submitted in smsc.submitted:
        smsc.sendReceipt(submitted.messageId, "DELIVRD")
    await waitForCode(relay, nid, "CH_SENT")
    return nid


class SmsOverSmtpTests(TestCase):
    timeout = 60

    async def relay(self, **account: Any) -> tuple[RunningRelay, SMSC]:
        smsc = await startSmsc(self)
        relay = await startRelay(self, extra=smsConfig(smsc))
        await relay.updateAccount(sms_enabled=True, networks=("127.0.0.0/8",), **account)
        await relay.store.addSender(Sender(ACCOUNT, SENDER_NUMBER, "sms"))
        return relay, smsc

    async def sentAndReceipted(self, relay: RunningRelay, smsc: SMSC, answer: str) -> str:
        return await sentAndReceipted(self, relay, smsc, answer)

    async def test_issueSessionWithStartTLS(self) -> None:
        relay, smsc = await self.relay()
        answers = await deferToThread(
            session,
            relay.ports["starttls"],
            b"Test SMS message via SMTP\r\n",
            relay.files.clientContext(),
        )
        nid = await self.sentAndReceipted(relay, smsc, answers[-1])
        (submitted,) = smsc.submitted
        self.assertEqual(submitted.text, "Test SMS message via SMTP")
        self.assertEqual(
            (submitted.message.source, submitted.message.destination),
            ("393331234567", "4477331234567"),
        )
        self.assertEqual(
            [code for _, code in await trailOf(relay, nid)],
            ["CAAS_RECEIVED", "CAAS_SENT", "CH_RECEIVED", "CH_SENT"],
        )

    async def test_issueSessionWithoutTLS(self) -> None:
        """The relay-by-IP listener: no TLS, no AUTH, as an ERP gateway submits."""
        relay, smsc = await self.relay()
        answers = await deferToThread(
            session, relay.ports["network"], b"Test SMS message via SMTP\r\n", None, False
        )
        await self.sentAndReceipted(relay, smsc, answers[-1])
        self.assertEqual(smsc.texts(), ["Test SMS message via SMTP"])

    async def test_gsm300InTwoParts(self) -> None:
        relay, smsc = await self.relay(sms_segments=2)
        text = " ".join(["concatenated"] * 25)[:300]
        answers = await deferToThread(
            session, relay.ports["network"], text.encode() + b"\r\n", None, False
        )
        await self.sentAndReceipted(relay, smsc, answers[-1])
        self.assertEqual(len(smsc.submitted), 2)
        self.assertEqual(smsc.texts(), [text])

    async def test_unicode71InTwoUcs2Parts(self) -> None:
        relay, smsc = await self.relay(sms_segments=2)
        text = "Привет" * 11 + "Приве"
        self.assertEqual(len(text), 71)
        answers = await deferToThread(
            session, relay.ports["network"], text.encode() + b"\r\n", None, False
        )
        await self.sentAndReceipted(relay, smsc, answers[-1])
        self.assertEqual([s.message.dataCoding for s in smsc.submitted], [8, 8])
        self.assertEqual(smsc.texts(), [text])

    async def test_mimeMessageToSmsDomain(self) -> None:
        """Outlook-style: ``00447731234567@<sms domain>`` and a text/plain body."""
        smsc = await startSmsc(self)
        relay = await startRelay(
            self, extra=smsConfig(smsc).replace("[sms]\n", '[sms]\ndomains = ["sms.test"]\n')
        )
        await relay.updateAccount(sms_enabled=True, networks=("127.0.0.0/8",))

        def send() -> str:
            with WireClient(relay.ports["network"]) as client:
                client.reply()
                client.command("EHLO client")
                client.command("MAIL FROM:<app@acme.example>")
                client.command("RCPT TO:<00447731234567@sms.test>")
                client.command("DATA")
                client.send(
                    b"From: app@acme.example\r\nTo: 00447731234567@sms.test\r\n"
                    b"Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
                    b"Hello from Outlook\r\n.\r\n"
                )
                reply = client.reply()
                return f"{reply.code} {reply.enhanced} {reply.text}"

        answer = await deferToThread(send)
        await self.sentAndReceipted(relay, smsc, answer)
        self.assertEqual(smsc.texts(), ["Hello from Outlook"])
        self.assertEqual(smsc.submitted[0].message.destination, "447731234567")


class ReceiptAfterRestartTests(TestCase):
    """The SMSC's receipt reaches a relay that did not send the text (SPEC §8.1): the one
    started on the same data_dir after the sender stopped. It finds the text's gateway ids
    in the store."""

    timeout = 60

    async def restarted(self, files: RelayFiles, smsc: SMSC) -> RunningRelay:
        """A new relay on ``files``, once its SMPP link is the simulator's only bound one."""
        binds = smsc.binds
        relay = RunningRelay(files)
        self.addCleanup(relay.stop)
        try:
            await relay.start()
        except AlreadyExists:  # the account is there from the first start
            pass
        await waitUntil(
            lambda: smsc.binds > binds and [c.bound for c in smsc.connections] == [True], 20
        )
        return relay

    async def sent(self, segments: int, text: str) -> tuple[RelayFiles, SMSC, RunningRelay, str]:
        """A relay that has sent ``text`` and written its CH_RECEIVED: the notification id."""
        smsc = await startSmsc(self)
        files = RelayFiles(Path(self.mktemp()), extra=smsConfig(smsc))
        first = RunningRelay(files)
        self.addCleanup(first.stop)
        await first.start()
        await first.updateAccount(
            sms_enabled=True, networks=("127.0.0.0/8",), sms_segments=segments
        )
        await first.store.addSender(Sender(ACCOUNT, SENDER_NUMBER, "sms"))
        answers = await deferToThread(
            session, first.ports["network"], text.encode() + b"\r\n", None, False
        )
        self.assertTrue(answers[-1].startswith("250 2.0.0"), answers[-1])
        nid = acceptedId(answers[-1].split(" ", 2)[2])
        await waitForCode(first, nid, "CH_RECEIVED")
        self.assertEqual(len(smsc.submitted), segments)
        return files, smsc, first, nid

    async def test_receiptAfterRestart(self) -> None:
        files, smsc, first, nid = await self.sent(1, "Your code is 1234")
        await first.stop()
        second = await self.restarted(files, smsc)
        smsc.sendReceipt(smsc.submitted[0].messageId, "DELIVRD")
        await waitForCode(second, nid, "CH_SENT")
        self.assertEqual(
            [code for _, code in await trailOf(second, nid)],
            ["CAAS_RECEIVED", "CAAS_SENT", "CH_RECEIVED", "CH_SENT"],
        )

    async def test_partsReceiptedAcrossRestart(self) -> None:
        """A text in two parts: the first part's receipt reaches the relay that sent it, the
        second the one after the restart, which completes the text: one CH_SENT; the receipt
        repeated changes nothing."""
        text = " ".join(["concatenated"] * 25)[:300]
        files, smsc, first, nid = await self.sent(2, text)
        firstPart, secondPart = (s.messageId for s in smsc.submitted)
        smsc.sendReceipt(firstPart, "DELIVRD")
        await deferLater(reactor, 0.5, lambda: None)
        self.assertNotIn("CH_SENT", [code for _, code in await trailOf(first, nid)])
        await first.stop()
        second = await self.restarted(files, smsc)
        smsc.sendReceipt(secondPart, "DELIVRD")
        await waitForCode(second, nid, "CH_SENT")
        smsc.sendReceipt(secondPart, "DELIVRD")
        await deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(
            [code for _, code in await trailOf(second, nid)],
            ["CAAS_RECEIVED", "CAAS_SENT", "CH_RECEIVED", "CH_SENT"],
        )

    async def test_failedPartAfterRestart(self) -> None:
        text = " ".join(["concatenated"] * 25)[:300]
        files, smsc, first, nid = await self.sent(2, text)
        await first.stop()
        second = await self.restarted(files, smsc)
        smsc.sendReceipt(smsc.submitted[1].messageId, "UNDELIV")
        await waitForCode(second, nid, "CH_FAILED")
        smsc.sendReceipt(smsc.submitted[0].messageId, "DELIVRD")
        await deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(
            [code for _, code in await trailOf(second, nid)],
            ["CAAS_RECEIVED", "CAAS_SENT", "CH_RECEIVED", "CH_FAILED"],
        )


async def waitForCode(relay: RunningRelay, nid: str, code: str, timeout: float = 20.0) -> None:
    deadline = reactor.seconds() + timeout
    while not any(e.status_code == code for e in await relay.store.statusTrail(nid)):
        if reactor.seconds() > deadline:
            raise AssertionError(f"no {code} in the trail of {nid}: {await trailOf(relay, nid)}")
        await deferLater(reactor, 0.05, lambda: None)


class HoldModeTests(TestCase):
    timeout = 60

    async def test_smsSentEmailHeldInHoldMode(self) -> None:
        """SPEC §8.2: ``mode`` governs e-mail only; with a gateway, SMS recipients go out in
        hold mode while the e-mail ones wait, held."""
        from tests.test_delivery_e2e import ALICE, submit

        smsc = await startSmsc(self)
        port = smsc.port.getHost().port
        relay = await startRelay(
            self,
            extra=f'[sms]\ngateway = "smpp://{SYSTEM_ID}:{SMSC_PASSWORD}@127.0.0.1:{port}"\n',
        )
        await relay.updateAccount(sms_enabled=True)
        nid = await deferToThread(submit, relay, [ALICE, TO])
        await waitForCode(relay, nid, "CH_RECEIVED")
        self.assertEqual(len(smsc.submitted), 1)
        deadline = reactor.seconds() + 10
        while (item := await relay.store.queueItem(nid)) is None or item.state != "held":
            self.assertLess(reactor.seconds(), deadline, item)
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual([r.address for r in item.pending], [ALICE])
        trail = await trailOf(relay, nid)
        self.assertNotIn((ALICE, "CAAS_SENT"), trail)
        self.assertIn((TO, "CAAS_SENT"), trail)


class SmsReportTests(TestCase):
    timeout = 60

    async def test_receiptMakesTheFinalReport(self) -> None:
        """An SMS with X-IB-notify-url: the gateway's acceptance is not final (a receipt
        follows), so the one report comes with the receipt: DELIVERED."""
        import json

        from tests.test_delivery_reports import startReceiver

        receiver, receiverPort = await startReceiver(self)
        smsc = await startSmsc(self)
        relay = await startRelay(
            self,
            extra=smsConfig(smsc) + '[delivery_reports]\nallow_networks = ["127.0.0.0/8"]\n',
        )
        await relay.updateAccount(sms_enabled=True, networks=("127.0.0.0/8",))
        await relay.store.addSender(Sender(ACCOUNT, SENDER_NUMBER, "sms"))
        text = (
            f"X-IB-notify-url: http://127.0.0.1:{receiverPort}/dlr\r\n"
            "X-IB-callback-data: order 66\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n\r\nYour code is 1234\r\n"
        )
        answers = await deferToThread(session, relay.ports["network"], text.encode(), None, False)
        nid = await sentAndReceipted(self, relay, smsc, answers[-1])
        await waitUntil(lambda: len(receiver.requests) >= 1, 20)
        await deferLater(reactor, 1.5, lambda: None)  # no second report follows
        self.assertEqual(len(receiver.requests), 1)
        (result,) = json.loads(receiver.requests[0][1])["results"]
        self.assertEqual(
            (result["messageId"], result["to"], result["callbackData"]), (nid, TO, "order 66")
        )
        self.assertEqual(result["status"]["groupName"], "DELIVERED")
