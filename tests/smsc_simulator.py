"""
An SMSC on loopback for the SMS tests and the benchmark: a real SMPP 3.4 server (Twisted, the
relay's own PDU framing and layouts) that binds transceivers, answers ``submit_sm`` with
message ids, sends ``deliver_sm`` receipts, and can be told to throttle, refuse, stay silent or
drop the connection.

``await startSmsc(testCase)`` starts one on a free port and stops it at cleanup.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor as globalReactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from mailrelay.delivery.sms import pdu
from mailrelay.delivery.sms.segments import readPart
from mailrelay.delivery.sms.smpp import PDUProtocol

SYSTEM_ID = "relay"
PASSWORD = "secret"


@dataclass(frozen=True)
class Submitted:
    """One submit_sm as the SMSC got it."""

    messageId: str
    message: pdu.ShortMessage

    @property
    def text(self) -> str:
        return readPart(
            self.message.shortMessage, self.message.esmClass, self.message.dataCoding
        ).text


class SMSCProtocol(PDUProtocol):
    def __init__(self, smsc: SMSC) -> None:
        self.smsc = smsc
        self.bound = False

    def connectionMade(self) -> None:
        self.smsc.connections.append(self)

    def connectionLost(self, reason: Any = None) -> None:
        if self in self.smsc.connections:
            self.smsc.connections.remove(self)

    def pduReceived(self, packet: pdu.PDU) -> None:
        smsc = self.smsc
        smsc.received.append(packet.commandId)
        if packet.commandId == pdu.BIND_TRANSCEIVER:
            bind = pdu.readBind(packet.body)
            ok = (bind.systemId, bind.password) == (smsc.systemId, smsc.password)
            self.bound = ok
            smsc.binds += ok
            status = pdu.ESME_ROK if ok else pdu.ESME_RINVPASWD
            self.sendPDU(
                pdu.PDU(
                    packet.commandId | pdu.RESPONSE,
                    packet.sequence,
                    status,
                    pdu.messageIdBody("SMSC"),
                )
            )
        elif packet.commandId == pdu.ENQUIRE_LINK:
            self.sendPDU(pdu.PDU(pdu.ENQUIRE_LINK | pdu.RESPONSE, packet.sequence))
        elif packet.commandId == pdu.SUBMIT_SM:
            self._submit(packet)
        elif packet.commandId == pdu.UNBIND:
            self.sendPDU(pdu.PDU(pdu.UNBIND | pdu.RESPONSE, packet.sequence))
            self.transport.loseConnection()
        elif packet.isResponse:
            smsc.responses.append(packet)

    def _submit(self, packet: pdu.PDU) -> None:
        smsc = self.smsc
        if not self.bound:
            self.sendPDU(pdu.PDU(pdu.SUBMIT_SM | pdu.RESPONSE, packet.sequence, 0x04))
            return
        if smsc.dropNext > 0:
            smsc.dropNext -= 1
            self.transport.loseConnection()
            return
        if smsc.throttleNext > 0:
            smsc.throttleNext -= 1
            smsc.throttledAnswers += 1
            self.sendPDU(pdu.PDU(pdu.SUBMIT_SM | pdu.RESPONSE, packet.sequence, 0x58))
            return
        if smsc.refuseWith:
            self.sendPDU(pdu.PDU(pdu.SUBMIT_SM | pdu.RESPONSE, packet.sequence, smsc.refuseWith))
            return
        messageId = f"m{next(smsc.ids)}"
        smsc.submitted.append(Submitted(messageId, pdu.readShortMessage(packet.body)))
        self.sendPDU(
            pdu.PDU(
                pdu.SUBMIT_SM | pdu.RESPONSE,
                packet.sequence,
                body=pdu.messageIdBody(messageId),
            )
        )
        if smsc.autoReceipt is not None:
            smsc.reactor.callLater(smsc.receiptDelay, smsc.sendReceipt, messageId, smsc.autoReceipt)


class SMSC(Factory):
    """The simulator's state, shared by its connections."""

    def __init__(self, reactor: Any = globalReactor) -> None:
        self.reactor = reactor
        self.systemId = SYSTEM_ID
        self.password = PASSWORD
        self.connections: list[SMSCProtocol] = []
        self.submitted: list[Submitted] = []
        self.received: list[int] = []
        self.responses: list[pdu.PDU] = []
        self.ids = itertools.count(1)
        self.binds = 0
        self.throttleNext = 0
        self.throttledAnswers = 0
        self.dropNext = 0
        self.refuseWith = 0
        self.autoReceipt: str | None = None  # "DELIVRD", "UNDELIV"...: sent after each submit
        self.receiptDelay = 0.0
        self.port: Any = None
        self._sequence = itertools.count(1)

    def buildProtocol(self, addr: Any) -> SMSCProtocol:
        return SMSCProtocol(self)

    def sendReceipt(self, messageId: str, state: str = "DELIVRD", tlvs: bool = False) -> None:
        """A deliver_sm receipt for ``messageId`` on the first bound connection."""
        submitted = next((s for s in self.submitted if s.messageId == messageId), None)
        text = (
            f"id:{messageId} sub:001 dlvrd:{'001' if state == 'DELIVRD' else '000'} "
            f"submit date:2401011200 done date:2401011201 stat:{state} err:000 text:"
        )
        fields = {}
        if tlvs:
            states = {"DELIVRD": 2, "UNDELIV": 5, "REJECTD": 8, "EXPIRED": 3}
            fields = {
                pdu.TAG_RECEIPTED_MESSAGE_ID: messageId.encode() + b"\x00",
                pdu.TAG_MESSAGE_STATE: bytes((states[state],)),
            }
        message = pdu.ShortMessage(
            source=submitted.message.destination if submitted else "447700000000",
            destination=submitted.message.source if submitted else "relay",
            shortMessage=text.encode("ascii"),
            esmClass=pdu.ESM_CLASS_RECEIPT,
            tlvs=fields,
        )
        for connection in self.connections:
            if connection.bound:
                connection.sendPDU(
                    pdu.PDU(pdu.DELIVER_SM, next(self._sequence), body=message.body())
                )
                return

    def texts(self) -> list[str]:
        """The texts submitted, concatenated parts joined in order (by reference and
        destination)."""
        whole: list[str] = []
        pending: dict[tuple[str, int], dict[int, str]] = {}
        for s in self.submitted:
            m = s.message
            part = readPart(m.shortMessage, m.esmClass, m.dataCoding)
            if part.reference is None:
                whole.append(part.text)
                continue
            key = (m.destination, part.reference)
            pending.setdefault(key, {})[part.sequence] = part.text
            if len(pending[key]) == part.total:
                whole.append("".join(text for _, text in sorted(pending.pop(key).items())))
        return whole

    def dropConnections(self) -> None:
        for connection in list(self.connections):
            connection.transport.loseConnection()


async def startSmsc(testCase: TestCase | None = None, reactor: Any = globalReactor) -> SMSC:
    smsc = SMSC(reactor)
    smsc.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(smsc)
    if testCase is not None:
        testCase.addCleanup(stopSmsc, smsc)
    return smsc


async def stopSmsc(smsc: SMSC) -> None:
    smsc.dropConnections()
    await smsc.port.stopListening()
    await deferLater(smsc.reactor, 0.01, lambda: None)


def waitUntil(
    condition: Any, timeout: float = 10.0, reactor: Any = globalReactor
) -> Deferred[None]:
    """Fires once ``condition()`` holds; fails after ``timeout`` seconds."""

    async def wait() -> None:
        deadline = reactor.seconds() + timeout
        while not condition():
            if reactor.seconds() > deadline:
                raise AssertionError("timed out waiting")
            await deferLater(reactor, 0.01, lambda: None)

    return Deferred.fromCoroutine(wait())
