"""
The SMPP 3.4 gateway: one transceiver bind to the SMSC, kept up as a service of the relay.

- :class:`PDUProtocol` frames PDUs on a stream (both this client and the tests' SMSC use it);
- :class:`SMPPClientProtocol` binds, sends ``submit_sm`` and waits for each response by sequence
  number, answers ``enquire_link`` and ``deliver_sm``, sends ``enquire_link`` when the link is
  idle and drops a link that does not answer;
- :class:`SMPPGateway` keeps one bound connection up through
  :class:`~twisted.application.internet.ClientService` (reconnecting with backoff), lets at most
  ``window`` submits be outstanding, backs off all submits when the SMSC answers
  ``ESME_RTHROTTLED``, and turns ``deliver_sm`` receipts into :class:`.receipts.Receipt`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredSemaphore, TimeoutError
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.delivery.sms import pdu
from mailrelay.delivery.sms.gateway import SmsMessage, Submission
from mailrelay.delivery.sms.receipts import Receipt, parseSmppReceipt
from mailrelay.delivery.sms.segments import TooManyParts, splitText

log = Logger()


@dataclass(frozen=True)
class SMPPSettings:
    host: str
    port: int
    systemId: str
    password: str = ""
    systemType: str = ""
    window: int = 10  # submit_sm outstanding at once
    responseTimeout: float = 30.0  # seconds a submit_sm (or bind, enquire_link) may wait
    enquireLinkInterval: float = 30.0  # seconds of silence before an enquire_link
    throttleBackoff: float = 1.0  # first pause after ESME_RTHROTTLED, doubling
    maxThrottleBackoff: float = 30.0
    throttleRetries: int = 5  # throttled answers to one submit before it is deferred
    connectWait: float = 10.0  # seconds a submit waits for a bound link before deferring
    bindRetryDelay: float = 30.0  # seconds before binding again after a refused bind

    def __repr__(self) -> str:
        return f"<SMPPSettings {self.systemId}@{self.host}:{self.port}>"


def parseSmppUrl(url: str) -> SMPPSettings:
    """Settings from ``smpp://USER:PASSWORD@host:port`` (percent-escapes undone); ValueError
    for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "smpp" or not parts.hostname or not parts.username:
        raise ValueError("an SMPP gateway is written smpp://USER:PASSWORD@host:port")
    return SMPPSettings(
        host=parts.hostname,
        port=parts.port or 2775,
        systemId=unquote(parts.username),
        password=unquote(parts.password or ""),
    )


class PDUProtocol(Protocol):
    """Cuts the stream into PDUs and hands each to :meth:`pduReceived`; a PDU that cannot be
    framed ends the connection (nothing after it can be trusted)."""

    _buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 16:
            try:
                length = pdu.decodeHeader(self._buffer)[0]
            except pdu.PDUError as e:
                log.warn("smpp: {error}; closing the connection", error=str(e))
                self._buffer = b""
                self._close()
                return
            if len(self._buffer) < length:
                return
            raw, self._buffer = self._buffer[:length], self._buffer[length:]
            self.pduReceived(pdu.decode(raw))

    def sendPDU(self, packet: pdu.PDU) -> None:
        assert self.transport is not None
        self.transport.write(packet.encode())

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def pduReceived(self, packet: pdu.PDU) -> None:
        raise NotImplementedError


class SMPPClientProtocol(PDUProtocol):
    """One connection to the SMSC, bound as a transceiver once :meth:`bind` fires."""

    def __init__(
        self, settings: SMPPSettings, clock: IReactorTime, onReceipt: Callable[[Receipt], Any]
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._onReceipt = onReceipt
        self._sequence = 0
        self._waiting: dict[int, tuple[Deferred[pdu.PDU], IDelayedCall]] = {}
        self._idle: IDelayedCall | None = None
        self.bound = False
        self.refused = False
        self.lost = False

    def nextSequence(self) -> int:
        self._sequence = self._sequence % 0x7FFFFFFF + 1
        return self._sequence

    def connectionMade(self) -> None:
        self._touch()

    def bind(self) -> Deferred[None]:
        """bind_transceiver with the configured credentials; fails with BindFailed."""
        settings = self._settings
        request = pdu.bindTransceiver(
            self.nextSequence(), settings.systemId, settings.password, settings.systemType
        )

        def bound(response: pdu.PDU) -> None:
            if response.status != pdu.ESME_ROK:
                # Not a failure of prepareConnection: ClientService would then leave the
                # connection open and trip over its loss. The link counts as up but unbound
                # (submits are deferred), and closes after a pause, so a wrong password does
                # not hammer the SMSC; then ClientService reconnects.
                log.error(
                    "smpp: bind_transceiver refused by {host}:{port}: status 0x{status:02x}",
                    host=settings.host,
                    port=settings.port,
                    status=response.status,
                )
                self.refused = True
                if self._idle is not None and self._idle.active():
                    self._idle.cancel()
                self._idle = self._clock.callLater(settings.bindRetryDelay, self._close)
                return
            self.bound = True
            log.info("smpp: bound to {host}:{port}", host=settings.host, port=settings.port)

        return self.request(request).addCallback(bound)

    def request(self, packet: pdu.PDU) -> Deferred[pdu.PDU]:
        """Send a request PDU; its response (any status), or TimeoutError / ConnectionLost."""
        if self.lost:
            return Deferred.fromCoroutine(_raise(ConnectionLost("the SMSC link is down")))
        d: Deferred[pdu.PDU] = Deferred()
        timer = self._clock.callLater(self._settings.responseTimeout, self._timedOut, packet)
        self._waiting[packet.sequence] = (d, timer)
        self.sendPDU(packet)
        return d

    def _timedOut(self, packet: pdu.PDU) -> None:
        waiting = self._waiting.pop(packet.sequence, None)
        if waiting is not None:
            log.warn("smpp: no answer to 0x{id:08x} in time; closing", id=packet.commandId)
            waiting[0].errback(TimeoutError())
            self._close()

    def _touch(self) -> None:
        if self.refused:
            return
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._settings.enquireLinkInterval)
        else:
            self._idle = self._clock.callLater(self._settings.enquireLinkInterval, self._enquire)

    def _enquire(self) -> None:
        self._idle = None
        if self.lost:
            return
        self.request(pdu.PDU(pdu.ENQUIRE_LINK, self.nextSequence())).addErrback(lambda _: None)
        self._touch()

    def pduReceived(self, packet: pdu.PDU) -> None:
        self._touch()
        if packet.isResponse:
            waiting = self._waiting.pop(packet.sequence, None)
            if waiting is None:
                log.warn("smpp: response to unknown sequence {seq}", seq=packet.sequence)
                return
            d, timer = waiting
            timer.cancel()
            d.callback(packet)
        elif packet.commandId == pdu.ENQUIRE_LINK:
            self.sendPDU(pdu.PDU(pdu.ENQUIRE_LINK | pdu.RESPONSE, packet.sequence))
        elif packet.commandId == pdu.DELIVER_SM:
            self._deliverSm(packet)
        elif packet.commandId == pdu.UNBIND:
            self.sendPDU(pdu.PDU(pdu.UNBIND | pdu.RESPONSE, packet.sequence))
            self._close()
        else:
            self.sendPDU(pdu.PDU(pdu.GENERIC_NACK, packet.sequence, pdu.ESME_RINVCMDID))

    def _deliverSm(self, packet: pdu.PDU) -> None:
        try:
            message = pdu.readShortMessage(packet.body)
        except pdu.PDUError as e:
            log.warn("smpp: unreadable deliver_sm: {error}", error=str(e))
            self.sendPDU(pdu.PDU(pdu.DELIVER_SM | pdu.RESPONSE, packet.sequence, pdu.ESME_RSYSERR))
            return
        # Answered first: the receipt is in memory now, and the SMSC must not resend it
        # because a store write is slow.
        self.sendPDU(pdu.PDU(pdu.DELIVER_SM | pdu.RESPONSE, packet.sequence, body=b"\x00"))
        if message.esmClass & 0x3C != pdu.ESM_CLASS_RECEIPT:
            log.info("smpp: mobile-originated message from {source} ignored", source=message.source)
            return
        ident, state = pdu.receiptFields(message)
        receipt = parseSmppReceipt(message.shortMessage.decode("latin-1"), ident, state)
        if receipt is None:
            log.warn("smpp: unreadable delivery receipt ignored")
            return
        self._onReceipt(receipt)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True
        self.bound = False
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        waiting, self._waiting = self._waiting, {}
        for d, timer in waiting.values():
            timer.cancel()
            d.errback(ConnectionLost("the SMSC link went down"))


async def _raise(error: Exception) -> Any:
    raise error


class _Factory(Factory):
    def __init__(self, gateway: SMPPGateway) -> None:
        self.gateway = gateway

    def buildProtocol(self, addr: Any) -> SMPPClientProtocol:
        protocol = SMPPClientProtocol(
            self.gateway.settings, self.gateway.clock, self.gateway.receiptReceived
        )
        protocol.factory = self
        return protocol


def _bind(protocol: Any) -> Deferred[None]:
    # ClientService hands out a proxy of the SMPPClientProtocol, which passes attributes on.
    bound: Deferred[None] = protocol.bind()
    return bound


class SMPPGateway(Service):
    """The SMSC as an :class:`~mailrelay.delivery.sms.gateway.SmsGateway` (see the module)."""

    def __init__(
        self,
        settings: SMPPSettings,
        reactor: Any,
        onReceipt: Callable[[Receipt], Any] = lambda receipt: None,
    ) -> None:
        self.settings = settings
        self.clock: IReactorTime = reactor
        self.label = f"{settings.host}:{settings.port}"
        self.onReceipt = onReceipt
        self._window = DeferredSemaphore(settings.window)
        self._pausedUntil = 0.0
        self._backoff = settings.throttleBackoff
        self.throttled = 0  # ESME_RTHROTTLED answers so far
        self._current: SMPPClientProtocol | None = None
        self._service = ClientService(
            HostnameEndpoint(reactor, settings.host, settings.port, timeout=10),
            _Factory(self),
            retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=30.0),
            clock=reactor,
            prepareConnection=_bind,
        )

    def receiptReceived(self, receipt: Receipt) -> None:
        self.onReceipt(receipt)

    def startService(self) -> None:
        super().startService()
        self._service.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        # On the next turn: a stop asked for from inside one of ClientService's own
        # callbacks (a submit finishing as the link comes up) would be re-entrant.
        stopped: Deferred[None] = deferLater(self.clock, 0, lambda: None)
        return stopped.addCallback(lambda _: self._service.stopService())

    def whenBound(self) -> Deferred[SMPPClientProtocol]:
        """The bound connection, once there is one (fails after a failed connection attempt
        or ``connectWait`` seconds)."""
        d = self._service.whenConnected(failAfterFailures=1)
        d.addTimeout(self.settings.connectWait, self.clock)
        return d  # type: ignore[return-value]  # _Factory builds SMPPClientProtocol

    async def _link(self) -> SMPPClientProtocol:
        """The bound link; one just lost is waited past (ClientService learns of the loss
        just after the protocol itself, which may already have a submit asking again)."""
        current = self._current
        if current is not None and current.bound and not current.lost:
            return current
        for _ in range(10):
            # Never from inside one of ClientService's transitions (a submit that continues
            # as the link comes up or goes down): it refuses re-entrant calls.
            await deferLater(self.clock, 0, lambda: None)
            protocol = await self.whenBound()
            if not protocol.lost:
                self._current = protocol
                return protocol
            await deferLater(self.clock, 0.01, lambda: None)
        raise ConnectionLost("the SMSC link keeps going down")

    def submit(self, message: SmsMessage) -> Deferred[Submission]:
        return Deferred.fromCoroutine(self._submit(message))

    async def _submit(self, message: SmsMessage) -> Submission:
        try:
            segments = splitText(message.text, message.reference)
        except TooManyParts as e:
            return Submission("failed", f"{self.label}: {e}")
        sourceTon, sourceNpi, source = pdu.address(message.sender)
        _, _, destination = pdu.address(message.recipient.address)
        ids: list[str] = []
        for part in segments.parts:
            fields = pdu.ShortMessage(
                source=source,
                destination=destination,
                shortMessage=part,
                esmClass=segments.esmClass,
                dataCoding=segments.dataCoding,
                registeredDelivery=1,
                sourceTon=sourceTon,
                sourceNpi=sourceNpi,
            )
            kind, reply, messageId = await self._submitPart(fields)
            if kind != "delivered":
                if ids:
                    reply += f" (after {len(ids)} of {len(segments.parts)} parts)"
                return Submission(kind, reply)
            ids.append(messageId)
        parts = f"{len(ids)} parts" if len(ids) > 1 else "1 part"
        reply = f"{self.label}: accepted {parts}: {' '.join(ids)}"
        return Submission("delivered", reply, tuple(ids))

    async def _submitPart(self, fields: pdu.ShortMessage) -> tuple[Any, str, str]:
        """("delivered" | "deferred" | "failed", reply, message id) for one submit_sm."""
        throttled = 0
        while True:
            wait = self._pausedUntil - self.clock.seconds()
            if wait > 0:
                await deferLater(self.clock, wait, lambda: None)
            try:
                protocol = await self._link()
            except Exception as e:
                return "deferred", f"{self.label}: no SMPP link: {type(e).__name__} {e}", ""
            if not protocol.bound:
                return "deferred", f"{self.label}: bind_transceiver refused", ""
            await self._window.acquire()
            try:
                response = await protocol.request(
                    pdu.PDU(pdu.SUBMIT_SM, protocol.nextSequence(), body=fields.body())
                )
            except (ConnectionLost, TimeoutError) as e:
                return (
                    "deferred",
                    f"{self.label}: {type(e).__name__} waiting for submit_sm_resp",
                    "",
                )
            finally:
                self._window.release()
            status = response.status
            if status == pdu.ESME_ROK:
                self._backoff = self.settings.throttleBackoff
                return "delivered", "", pdu.readMessageId(response.body)
            reply = f"{self.label}: submit_sm_resp status 0x{status:02x}"
            if status == pdu.ESME_RTHROTTLED:
                self.throttled += 1
                throttled += 1
                if throttled > self.settings.throttleRetries:
                    return "deferred", reply + " (throttled)", ""
                # Every submit waits, not only this one: the SMSC counts the link's rate.
                self._pausedUntil = max(self._pausedUntil, self.clock.seconds() + self._backoff)
                self._backoff = min(self._backoff * 2, self.settings.maxThrottleBackoff)
                continue
            if status in pdu.TEMPORARY_ERRORS:
                return "deferred", reply, ""
            return "failed", reply, ""
