"""
The outbound ESMTP client: one connection to one remote host.

Three layers, each testable on its own:

- :class:`SMTPClientProtocol` speaks the wire: it writes commands, matches replies to them in
  order (so pipelined commands need nothing special), starts TLS on request and enforces a
  timeout on every reply and on the TLS handshake. It knows nothing of mail.
- :class:`SMTPSession` is one greeted connection to one :class:`Candidate`: EHLO (or HELO),
  STARTTLS as the :class:`TLSPolicy` says, AUTH, then :meth:`SMTPSession.transact` per message.
  It turns every problem into one of two exceptions: :class:`HostFailure` (this host cannot be
  used now: try the next candidate) or :class:`EnvelopeRefused` (no host will do better).
- :func:`openSession` connects to a candidate and starts a session on it.

The pool (:mod:`mailrelay.delivery.smtp.pool`) decides which candidate to try and when.
Postfix's smtp(8) is the model for the decisions and the status texts.
"""

from __future__ import annotations

import base64
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet._idna import _idnaBytes
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import (
    ConnectError,
    ConnectionRefusedError,
    DNSLookupError,
    NoRouteError,
    TCPTimedOutError,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.delivery.route import Candidate, Credentials, TLSPolicy
from mailrelay.delivery.smtp.reply import ReplyParser, SMTPProtocolError, SMTPReply
from mailrelay.sendnow import writeNow

log = Logger()

QUIT_TIMEOUT = 10.0
"""Seconds to wait for the reply to QUIT (and for the close after it) before aborting."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_UNSAFE_ADDRESS = re.compile(r"[\x00-\x1f\x7f<>]")
_BARE_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait, as Postfix's defaults: for the TCP connection, for the greeting and each
    command's reply (and a TLS handshake), and for the reply to the end of the message."""

    connect: float = 30.0
    command: float = 300.0
    data: float = 600.0


@dataclass(frozen=True)
class Envelope:
    """
    One message to send: ``sender`` ('' for the null sender), the recipients' addresses, and
    the message as CRLF-terminated lines, not dot-stuffed (the client does that).
    """

    sender: str
    recipients: tuple[str, ...]
    message: bytes = field(repr=False)


OutcomeKind = Literal["delivered", "deferred", "failed"]


@dataclass(frozen=True)
class RecipientOutcome:
    """
    What became of one recipient.

    ``reply`` is the text for the status trail (``"mx.example.net: 550 5.1.1 No such user"``,
    or a local reason such as ``"mx.example.net: connection refused"``); ``host`` is the remote
    host that answered ('' if none did); ``dsnCode`` the RFC 3463 status, whose class always
    matches ``kind`` (2 delivered, 4 deferred, 5 failed); ``remoteCode`` the SMTP reply code,
    0 when the outcome is not a remote reply.
    """

    recipient: str
    kind: OutcomeKind
    reply: str
    host: str
    dsnCode: str
    remoteCode: int


def isSafeAddress(address: str) -> bool:
    """True if ``address`` can go between ``<>`` in MAIL or RCPT: no control characters (which
    could end the command line and start another) and no angle brackets."""
    return not _UNSAFE_ADDRESS.search(address)


def statusText(host: str, reason: str) -> str:
    """``"host: reason"`` for the status trail, without control characters."""
    text = f"{host}: {reason}" if host else reason
    return _CONTROL.sub("", text)


def dsnCodeFor(kind: OutcomeKind, reply: SMTPReply | None, default: str) -> str:
    """
    The RFC 3463 code of an outcome: the reply's enhanced code when it has one, else
    ``default``; either way with the class digit of ``kind`` (a server that says ``450 5.1.1``
    has not failed the recipient permanently).
    """
    code = (reply.enhanced if reply is not None else None) or default
    return {"delivered": "2", "deferred": "4", "failed": "5"}[kind] + code[1:]


def outcomeFromReply(recipient: str, host: str, reply: SMTPReply) -> RecipientOutcome:
    """The outcome a remote reply gives: 2xx delivered, 4xx deferred, 5xx failed."""
    kind: OutcomeKind = (
        "delivered" if reply.isPositive else "deferred" if reply.isTemporary else "failed"
    )
    return RecipientOutcome(
        recipient,
        kind,
        statusText(host, reply.text),
        host,
        dsnCodeFor(kind, reply, "X.0.0"),
        reply.code,
    )


class HostFailure(Exception):
    """
    This host cannot be used now: try the next candidate.

    ``host`` is the host's name if it answered, '' if it never did; ``permanent`` is true when
    it answered 5xx where no mail can follow (greeting, HELO); ``tlsFailure`` when the TLS
    handshake failed or never finished (opportunistic TLS may then try again in clear).
    ``decided`` holds the outcomes of recipients the host had already answered for.
    """

    def __init__(
        self,
        name: str,
        host: str,
        reason: str,
        dsnCode: str,
        remoteCode: int = 0,
        *,
        permanent: bool = False,
        tlsFailure: bool = False,
    ) -> None:
        super().__init__(statusText(name, reason))
        self.name = name
        self.host = host
        self.reason = reason
        self.dsnCode = dsnCode
        self.remoteCode = remoteCode
        self.permanent = permanent
        self.tlsFailure = tlsFailure
        self.decided: list[RecipientOutcome] = []

    @classmethod
    def fromReply(cls, name: str, reply: SMTPReply, *, permanent: bool = False) -> HostFailure:
        """The failure a remote reply (421, a refused greeting, ...) means."""
        return cls(
            name,
            name,
            reply.text,
            dsnCodeFor("failed" if permanent else "deferred", reply, "X.0.0"),
            reply.code,
            permanent=permanent,
        )

    def outcome(self, recipient: str, permanent: bool | None = None) -> RecipientOutcome:
        """The outcome of a recipient no later host took: failed if permanent (by default
        this failure's :attr:`permanent`), else deferred."""
        kind: OutcomeKind = (
            "failed" if (self.permanent if permanent is None else permanent) else "deferred"
        )
        return RecipientOutcome(
            recipient,
            kind,
            statusText(self.name, self.reason),
            self.host,
            {"failed": "5", "deferred": "4"}[kind] + self.dsnCode[1:],
            self.remoteCode,
        )


class EnvelopeRefused(Exception):
    """
    Every recipient not yet answered for gets the same outcome, and no other host is tried:
    the sender was refused (MAIL 5xx), the message cannot go to this host as it is (too big,
    8-bit or UTF-8 without the extension), or authentication was refused.
    """

    def __init__(
        self,
        kind: OutcomeKind,
        name: str,
        host: str,
        reason: str,
        dsnCode: str,
        remoteCode: int = 0,
    ) -> None:
        super().__init__(statusText(name, reason))
        self.kind = kind
        self.name = name
        self.host = host
        self.reason = reason
        self.dsnCode = dsnCode
        self.remoteCode = remoteCode

    @classmethod
    def fromReply(cls, kind: OutcomeKind, name: str, reply: SMTPReply) -> EnvelopeRefused:
        return cls(kind, name, name, reply.text, dsnCodeFor(kind, reply, "X.0.0"), reply.code)

    def outcome(self, recipient: str) -> RecipientOutcome:
        return RecipientOutcome(
            recipient,
            self.kind,
            statusText(self.name, self.reason),
            self.host,
            self.dsnCode,
            self.remoteCode,
        )


class ReplyTimeout(Exception):
    """No complete reply (or TLS handshake) within the timeout."""


class ConnectionClosed(Exception):
    """The connection was lost (or closed by us) before the reply came."""

    def __init__(self, reason: Failure | None = None) -> None:
        super().__init__("connection lost")
        self.reason = reason


@implementer(IHandshakeListener)
class SMTPClientProtocol(Protocol):
    """
    Commands out, replies in, in order.

    Every reply is awaited through a Deferred that fires with the :class:`SMTPReply`, or fails
    with :class:`ReplyTimeout`, :class:`ConnectionClosed` or :class:`SMTPProtocolError`. The
    clock runs one timer, for the oldest reply awaited: a reply must be complete within its
    timeout (a server trickling one byte at a time gains nothing). On a timeout or a protocol
    error the connection is aborted and every awaited reply fails.
    """

    def __init__(self, clock: IReactorTime, timeouts: Timeouts) -> None:
        self.clock = clock
        self.timeouts = timeouts
        self._parser = ReplyParser()
        self._waiting: deque[tuple[Deferred[SMTPReply], float, str]] = deque()
        self._timer: IDelayedCall | None = None
        self._timerFor: str | None = None  # what the timer waits for (None: nothing now)
        self._abortCall: IDelayedCall | None = None
        self._aborted = False
        self._handshake: Deferred[None] | None = None
        self._lost: list[Deferred[None]] = []
        self.greeting: Deferred[SMTPReply] | None = None
        self.closed = False
        """True once the connection is lost or being closed: no command can be sent."""
        self.lostReason: Failure | None = None
        self.onLost: Callable[[], object] | None = None
        """Called once when the connection is lost (the pool watches its idle connections)."""

    # -- IProtocol

    def connectionMade(self) -> None:
        self.greeting = self._expect("greeting", self.timeouts.command)

    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except SMTPProtocolError as error:
            self._fail(error)
            return
        if self.closed:
            return
        answered: list[tuple[Deferred[SMTPReply], SMTPReply]] = []
        for reply in replies:
            if not self._waiting:
                # A reply nothing asked for (an idle connection's "421 timeout"): the
                # conversation is out of step, so the connection is of no further use.
                log.debug("unexpected reply {code}", code=reply.code)
                self._answer(answered)
                self._fail(SMTPProtocolError("reply to no command"), abort=False)
                return
            waiter, _, _ = self._waiting.popleft()
            answered.append((waiter, reply))
        if answered:
            self._armTimer()
            self._answer(answered)

    @staticmethod
    def _answer(answered: list[tuple[Deferred[SMTPReply], SMTPReply]]) -> None:
        """Fire the waiters of replies read together, the last first: the caller awaiting
        the first of a pipeline then finds the others answered, rather than waiting for
        each in a turn of its own through the callbacks."""
        for waiter, reply in reversed(answered):
            waiter.callback(reply)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lostReason = reason
        if self._abortCall is not None and self._abortCall.active():
            self._abortCall.cancel()
        self._fail(ConnectionClosed(reason), abort=False)
        lost, self._lost = self._lost, []
        for waiter in lost:
            waiter.callback(None)
        onLost, self.onLost = self.onLost, None
        if onLost is not None:
            onLost()

    def handshakeCompleted(self) -> None:
        handshake, self._handshake = self._handshake, None
        if handshake is not None:
            self._cancelTimer()
            self._armTimer()
            handshake.callback(None)

    # -- commands

    def command(
        self, line: str, what: str | None = None, timeout: float | None = None
    ) -> Deferred[SMTPReply]:
        """Send one command line (CRLF added); the Deferred fires with its reply. ``what``
        names the command in timeouts' reasons (the first word of ``line`` by default: an AUTH
        line's secret never goes into a log)."""
        return self.pipeline([line], [what or line.split(" ", 1)[0]], timeout)[0]

    def pipeline(
        self,
        lines: Sequence[str],
        names: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> list[Deferred[SMTPReply]]:
        """Send several commands in one write; one Deferred per command, in order."""
        names = names or [line.split(" ", 1)[0] for line in lines]
        if self.closed:
            return [self._closedDeferred() for _ in lines]
        writeNow(self.transport, b"".join(line.encode("utf-8") + b"\r\n" for line in lines))
        wait = self.timeouts.command if timeout is None else timeout
        return [self._expect(name, wait) for name in names]

    def sendMessage(self, message: bytes) -> Deferred[SMTPReply]:
        """
        Send a message after DATA's 354: line ends made CRLF (a bare CR or LF would let a
        receiver see a different end of data than we mean), dot-stuffed, ended with CRLF.CRLF.
        The Deferred fires with the reply to the end of data (the data timeout).
        """
        if self.closed:
            return self._closedDeferred()
        writeNow(self.transport, dotStuff(message) + b".\r\n")
        return self._expect("end of data", self.timeouts.data)

    def startTLS(self, creator: IOpenSSLClientConnectionCreator) -> Deferred[None]:
        """Start a TLS handshake; fires when it is complete (fails as a reply would)."""
        if self.closed:
            return self._closedDeferred()
        if self._waiting or self._parser.buffered:
            # Bytes after the 220 to STARTTLS were sent before TLS protected them (a
            # STARTTLS injection): they must not be read as if they came over TLS.
            self._fail(SMTPProtocolError("data after the reply to STARTTLS"))
            return self._closedDeferred()
        handshake: Deferred[None] = Deferred()
        self._handshake = handshake
        transport: Any = self.transport
        transport.startTLS(creator)
        if self._handshake is handshake:
            self._setTimer(self.timeouts.command, "TLS")
        return handshake

    def quit(self) -> Deferred[None]:
        """Send QUIT and close, whatever the server answers; fires when the connection is gone."""
        if self.closed:
            return self.whenLost()
        lost = self.whenLost()
        reply = self.command("QUIT", timeout=min(QUIT_TIMEOUT, self.timeouts.command))
        reply.addBoth(lambda _: self.close())
        return lost

    def close(self) -> None:
        """Close the connection (aborting it if it has not closed within QUIT_TIMEOUT)."""
        if self.lostReason is None:
            self._fail(ConnectionClosed(), abort=False)

    def abort(self) -> None:
        """Drop the connection at once (after a timeout or when the conversation is broken)."""
        self._fail(ConnectionClosed())

    def whenLost(self) -> Deferred[None]:
        """A Deferred that fires (with None) when the connection is lost."""
        waiter: Deferred[None] = Deferred()
        if self.lostReason is not None:
            waiter.callback(None)
        else:
            self._lost.append(waiter)
        return waiter

    # -- internals

    def _expect(self, name: str, timeout: float) -> Deferred[SMTPReply]:
        waiter: Deferred[SMTPReply] = Deferred()
        self._waiting.append((waiter, timeout, name))
        if len(self._waiting) == 1:
            self._armTimer()
        return waiter

    def _closedDeferred(self) -> Deferred[Any]:
        waiter: Deferred[Any] = Deferred()
        waiter.errback(ConnectionClosed(self.lostReason))
        return waiter

    def _armTimer(self) -> None:
        """Time the oldest reply awaited. With none awaited the timer is left to run out
        unheeded: the next command moves it later, cheaper than cancelling it now and
        making another then (four times a message on a reused connection)."""
        if self._waiting:
            _, timeout, name = self._waiting[0]
            self._setTimer(timeout, name)
        else:
            self._timerFor = None

    def _setTimer(self, timeout: float, name: str) -> None:
        """Time out waiting for ``name`` in ``timeout`` seconds: the running timer moved
        later if it can be (a change of a number), else a new one."""
        self._timerFor = name
        timer = self._timer
        if timer is not None and timer.active():
            if self.clock.seconds() + timeout >= timer.getTime():
                timer.reset(timeout)
                return
            timer.cancel()  # sooner: the reactor would search its heap for the call to move
        self._timer = self.clock.callLater(timeout, self._timedOut)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timerFor = None

    def _timedOut(self) -> None:
        self._timer = None
        name, self._timerFor = self._timerFor, None
        if name is None:
            return  # nothing was awaited when it ran out
        log.debug("timed out waiting for {what}", what=name)
        self._fail(ReplyTimeout(name))

    def _fail(self, error: Exception, abort: bool = True) -> None:
        """Fail everything awaited with ``error``; close the connection (abort it if asked)."""
        self._cancelTimer()
        wasClosed, self.closed = self.closed, True
        transport: Any = self.transport
        if transport is not None and self.lostReason is None:
            if abort and not self._aborted:
                self._aborted = True
                transport.abortConnection()
            elif not wasClosed:
                transport.loseConnection()
                # A peer that reads nothing would keep a closing connection open forever.
                self._abortCall = self.clock.callLater(QUIT_TIMEOUT, transport.abortConnection)
        waiters: list[Deferred[Any]] = [waiter for waiter, _, _ in self._waiting]
        self._waiting.clear()
        handshake, self._handshake = self._handshake, None
        if handshake is not None:
            waiters.append(handshake)
        for waiter in waiters:
            waiter.errback(Failure(error))


class SMTPClientFactory(Factory):
    """Builds :class:`SMTPClientProtocol` instances sharing one clock and timeouts."""

    noisy = False  # one connection per transaction at most: the delivery log line says enough

    def __init__(self, clock: IReactorTime, timeouts: Timeouts) -> None:
        self.clock = clock
        self.timeouts = timeouts

    def buildProtocol(self, addr: Any) -> SMTPClientProtocol:
        return SMTPClientProtocol(self.clock, self.timeouts)


def dotStuff(message: bytes) -> bytes:
    """``message`` with CRLF line ends, dot-stuffed, ending with CRLF (not yet with ``.``)."""
    # Counting allocates nothing: a bare CR or LF is one not paired in a CRLF.
    pairs = message.count(b"\r\n")
    if message.count(b"\r") != pairs or message.count(b"\n") != pairs:
        message = _BARE_LINE_END.sub(b"\r\n", message)
    if message.startswith(b"."):
        message = b"." + message
    message = message.replace(b"\r\n.", b"\r\n..")
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message


@implementer(IOpenSSLClientConnectionCreator)
class UnverifiedClientTLS:
    """TLS for opportunistic STARTTLS: the host's name as SNI, the certificate not checked
    (RFC 7435: encryption against passive eavesdroppers is better than none)."""

    def __init__(self, host: str) -> None:
        self._options = CertificateOptions()
        self._serverName: bytes | None = None
        if not (isIPAddress(host) or isIPv6Address(host)):
            try:
                self._serverName = _idnaBytes(host)
            except (UnicodeError, ValueError):
                self._serverName = None

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._serverName:
            connection.set_tlsext_host_name(self._serverName)
        return connection


TLSCreator = Callable[[str, bool], IOpenSSLClientConnectionCreator]
"""Makes the TLS settings for a host name: verified (True) or not (False). May raise
:class:`HostFailure` (trust roots that cannot be read)."""


class SMTPSession:
    """
    One greeted, ready connection to one host.

    After :meth:`start`: ``capabilities`` maps each EHLO keyword (upper case) to its parameters
    ('' when none; empty after HELO), ``esmtp`` says whether EHLO was accepted, ``secure``
    whether TLS is on. :meth:`transact` sends one message; :meth:`reset` and :meth:`quit`
    manage the connection between messages.
    """

    def __init__(
        self,
        protocol: SMTPClientProtocol,
        candidate: Candidate,
        heloName: str,
        tls: TLSPolicy,
        credentials: Credentials | None = None,
        tlsCreator: TLSCreator | None = None,
        startTLS: bool = True,
    ) -> None:
        self.protocol = protocol
        self.candidate = candidate
        self.heloName = heloName
        self.tls = tls
        self.credentials = credentials
        self._tlsCreator = tlsCreator or defaultTLSCreator(tls)
        self._startTLS = startTLS and tls.mode in ("opportunistic", "verify")
        self.name = candidate.host
        self.capabilities: dict[str, str] = {}
        self.esmtp = False
        self.secure = tls.mode == "implicit"
        self.answered = False
        """True once the host has sent a well-formed greeting (the host "was reached")."""
        self._tlsPhase = tls.mode == "implicit"
        self.transactions = 0

    @property
    def usable(self) -> bool:
        """True while the connection is open and in step (it may carry another message)."""
        return not self.protocol.closed

    # -- opening

    async def start(self) -> None:
        """Greeting, EHLO/HELO, STARTTLS (per policy), AUTH; raises HostFailure or
        EnvelopeRefused (and the connection is then closed)."""
        try:
            await self._start()
        except (HostFailure, EnvelopeRefused):
            self.protocol.abort()
            raise

    async def _start(self) -> None:
        assert self.protocol.greeting is not None
        greeting = await self._reply(self.protocol.greeting, "the initial greeting")
        self.answered = True
        if greeting.code != 220:
            raise HostFailure.fromReply(self.name, greeting, permanent=greeting.isPermanent)
        await self._hello()
        if self._startTLS and not self.secure:
            if "STARTTLS" in self.capabilities:
                await self._startTLSNow()
            elif self.tls.mode == "verify":
                raise HostFailure(
                    self.name, self.name, "TLS required, but STARTTLS was not offered", "4.7.10"
                )
        if self.credentials is not None:
            await self._authenticate(self.credentials)

    async def _hello(self) -> None:
        reply = await self._reply(self.protocol.command(f"EHLO {self.heloName}"), "EHLO")
        self._tlsPhase = False
        self.capabilities = {}
        if reply.code == 250:
            self.esmtp = True
            for line in reply.lines[1:]:
                keyword, _, parameters = line.strip().partition(" ")
                self.capabilities[keyword.upper()] = parameters.strip()
            return
        if not reply.isPermanent:
            raise HostFailure.fromReply(self.name, reply)
        # EHLO refused: an RFC 821 server. HELO, and no extensions.
        self.esmtp = False
        reply = await self._reply(self.protocol.command(f"HELO {self.heloName}"), "HELO")
        if reply.code != 250:
            raise HostFailure.fromReply(self.name, reply, permanent=reply.isPermanent)

    async def _startTLSNow(self) -> None:
        reply = await self._reply(self.protocol.command("STARTTLS"), "STARTTLS")
        if reply.code != 220:
            if self.tls.mode == "verify":
                raise HostFailure(
                    self.name, self.name, f"TLS required, but STARTTLS failed: {reply.text}",
                    "4.7.10", reply.code,
                )  # fmt: skip
            return  # opportunistic: go on in clear, as the server is still in command state
        creator = self._tlsCreator(self.name, self.tls.mode == "verify")
        self._tlsPhase = True
        await self._await(self.protocol.startTLS(creator), "the TLS handshake")
        self.secure = True
        # RFC 3207: forget what was learnt before TLS; ask again.
        await self._hello()

    async def _authenticate(self, credentials: Credentials) -> None:
        if "AUTH" not in self.capabilities:
            # Nothing to log in to: the server may relay for us without (by address).
            return
        if not self.secure and self.tls.mode != "none":
            raise HostFailure(
                self.name, self.name, "credentials not sent: TLS is not available", "4.7.10"
            )
        mechanisms = self.capabilities["AUTH"].upper().split()
        user = credentials.username.encode("utf-8")
        password = credentials.password.encode("utf-8")
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + password).decode("ascii")
            reply = await self._reply(self.protocol.command(f"AUTH PLAIN {token}", "AUTH"), "AUTH")
        elif "LOGIN" in mechanisms:
            reply = await self._reply(self.protocol.command("AUTH LOGIN"), "AUTH")
            for secret in (user, password):
                if reply.code != 334:
                    break
                token = base64.b64encode(secret).decode("ascii")
                reply = await self._reply(self.protocol.command(token, "AUTH"), "AUTH")
        else:
            raise EnvelopeRefused(
                "deferred", self.name, self.name, "no supported AUTH mechanism offered", "4.7.0"
            )
        if reply.code == 235:
            return
        if reply.isTemporary or reply.isPositive:
            if reply.isPositive:
                self.protocol.abort()  # a 334 after the password: the exchange is out of step
            raise HostFailure.fromReply(self.name, reply)
        # 535 and kin: the operator's credentials are wrong. Defer (not bounce) the mail.
        raise EnvelopeRefused.fromReply("deferred", self.name, reply)

    # -- one message

    async def transact(
        self, sender: str, recipients: Sequence[str], message: bytes
    ) -> list[RecipientOutcome]:
        """
        Send one message to ``recipients`` (distinct addresses): one outcome per recipient, in
        order. Raises :class:`HostFailure` (``decided`` then holds the outcomes already known)
        or :class:`EnvelopeRefused`. The connection is in command state afterwards if
        :attr:`usable`.
        """
        self.transactions += 1
        decided: dict[str, RecipientOutcome] = {}
        try:
            return await self._transact(sender, recipients, message, decided)
        except HostFailure as failure:
            failure.decided = list(decided.values())
            self.protocol.abort()
            raise

    async def _transact(
        self,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        decided: dict[str, RecipientOutcome],
    ) -> list[RecipientOutcome]:
        mail = f"MAIL FROM:<{sender}>{self._mailParameters(sender, recipients, message)}"
        rcpts = [f"RCPT TO:<{recipient}>" for recipient in recipients]
        accepted: list[str] = []

        if "PIPELINING" in self.capabilities:
            pipelined = self.protocol.pipeline([mail, *rcpts, "DATA"])
            mailReply, *rcptReplies, dataReply = pipelined
            try:
                mailAnswer = await self._reply(mailReply, "MAIL FROM")
                rcptAnswers = [await self._reply(reply, "RCPT TO") for reply in rcptReplies]
                dataAnswer = await self._reply(dataReply, "DATA")
            finally:
                # After a failure, the replies not awaited fail too: nobody needs to hear.
                for waiting in pipelined:
                    waiting.addErrback(lambda _: None)
            if not mailAnswer.isPositive:
                await self._abandonData(dataAnswer)
                self._refuseSender(mailAnswer)
            for recipient, answer in zip(recipients, rcptAnswers, strict=True):
                self._recordRcpt(recipient, answer, decided, accepted)
            if not accepted:
                await self._abandonData(dataAnswer)
                return [decided[recipient] for recipient in recipients]
        else:
            mailAnswer = await self._reply(self.protocol.command(mail, "MAIL FROM"), "MAIL FROM")
            if not mailAnswer.isPositive:
                self._refuseSender(mailAnswer)
            for recipient, rcpt in zip(recipients, rcpts, strict=True):
                answer = await self._reply(self.protocol.command(rcpt, "RCPT TO"), "RCPT TO")
                self._recordRcpt(recipient, answer, decided, accepted)
            if not accepted:
                await self.reset()
                return [decided[recipient] for recipient in recipients]
            dataAnswer = await self._reply(self.protocol.command("DATA"), "DATA")

        if dataAnswer.code != 354:
            if dataAnswer.isPositive:  # a 2xx to DATA: the server is out of step with us
                raise HostFailure.fromReply(self.name, dataAnswer)
            final = dataAnswer
        else:
            final = await self._reply(self.protocol.sendMessage(message), "end of data")
            if final.code == 354 or 300 <= final.code < 400:
                raise HostFailure.fromReply(self.name, final)
        for recipient in accepted:
            decided[recipient] = outcomeFromReply(recipient, self.name, final)
        return [decided[recipient] for recipient in recipients]

    def _mailParameters(self, sender: str, recipients: Sequence[str], message: bytes) -> str:
        """The MAIL FROM parameters the message needs; raises EnvelopeRefused when the server
        cannot take it (Postfix bounces these too: no other host would be asked)."""
        needsUTF8 = not (sender.isascii() and all(r.isascii() for r in recipients))
        eightBit = not message.isascii()
        parameters = []
        if "SIZE" in self.capabilities:
            limit = self.capabilities["SIZE"]
            size = len(message)
            if limit.isdecimal() and 0 < int(limit) < size:
                raise EnvelopeRefused(
                    "failed", self.name, self.name,
                    f"message size {size} exceeds size limit {int(limit)} of server",
                    "5.3.4",
                )  # fmt: skip
            parameters.append(f"SIZE={size}")
        if eightBit:
            if "8BITMIME" not in self.capabilities:
                raise EnvelopeRefused(
                    "failed", self.name, self.name,
                    "message has 8-bit content, which the server does not support (8BITMIME)",
                    "5.6.3",
                )  # fmt: skip
            parameters.append("BODY=8BITMIME")
        if needsUTF8:
            if "SMTPUTF8" not in self.capabilities:
                raise EnvelopeRefused(
                    "failed", self.name, self.name,
                    "the server does not support SMTPUTF8, which the addresses need",
                    "5.6.7",
                )  # fmt: skip
            parameters.append("SMTPUTF8")
        return "".join(f" {parameter}" for parameter in parameters)

    def _refuseSender(self, reply: SMTPReply) -> None:
        if reply.isPermanent:
            raise EnvelopeRefused.fromReply("failed", self.name, reply)
        # MAIL FROM 4xx: as Postfix, a problem of this host (another may take the mail).
        raise HostFailure.fromReply(self.name, reply)

    def _recordRcpt(
        self,
        recipient: str,
        reply: SMTPReply,
        decided: dict[str, RecipientOutcome],
        accepted: list[str],
    ) -> None:
        if 200 <= reply.code < 300:
            accepted.append(recipient)
        elif reply.isPositive:
            raise HostFailure.fromReply(self.name, reply)  # out of step
        else:
            decided[recipient] = outcomeFromReply(recipient, self.name, reply)

    async def _abandonData(self, dataAnswer: SMTPReply) -> None:
        """After a pipelined DATA nobody wants: end an accepted DATA empty, then RSET."""
        if dataAnswer.code == 354:
            await self._reply(self.protocol.sendMessage(b""), "end of data")
        await self.reset()

    # -- between messages

    async def reset(self, timeout: float | None = None) -> bool:
        """RSET; True if the server is ready for another message (else the connection is
        closed). ``timeout``: seconds for the reply, the command timeout by default."""
        try:
            reply = await self._reply(self.protocol.command("RSET", timeout=timeout), "RSET")
        except HostFailure:
            self.protocol.abort()
            return False
        if reply.code != 250:
            self.protocol.abort()
            return False
        return True

    def quit(self) -> Deferred[None]:
        """QUIT and close; fires when the connection is gone."""
        return self.protocol.quit()

    # -- replies and failures

    async def _reply(self, waiting: Deferred[SMTPReply], what: str) -> SMTPReply:
        reply = await self._await(waiting, what)
        if reply.code == 421:
            # "Service not available, closing transmission channel": anywhere, the host's.
            raise HostFailure.fromReply(self.name, reply)
        return reply

    async def _await(self, waiting: Deferred[Any], what: str) -> Any:
        """The result of ``waiting``, with every local failure turned into a HostFailure."""
        try:
            return await waiting
        except ReplyTimeout:
            failure = self._hostFailure(
                f"conversation timed out while waiting for {what}", timedOut=True
            )
        except ConnectionClosed as closed:
            failure = self._hostFailure(f"lost connection while waiting for {what}", closed)
        except SMTPProtocolError as error:
            failure = self._hostFailure(f"protocol error after {what}: {error}")
        raise failure

    def _hostFailure(
        self, reason: str, closed: ConnectionClosed | None = None, timedOut: bool = False
    ) -> HostFailure:
        host = self.name if self.answered else ""
        if self._tlsPhase:
            if timedOut:
                why = "TLS handshake timed out"
            elif _isVerification(closed):
                why = "certificate verification failed"
            else:
                why = "TLS handshake failed"
            required = self.tls.mode in ("verify", "implicit")
            text = f"TLS required, but {why}" if required else why
            return HostFailure(self.name, host, text, "4.7.5", tlsFailure=True)
        return HostFailure(self.name, host, reason, "4.4.2")


def _isVerification(closed: ConnectionClosed | None) -> bool:
    if closed is None or closed.reason is None:
        return False
    error = closed.reason.value
    if isinstance(error, VerificationError):
        return True
    return isinstance(error, SSL.Error) and "certificate verify failed" in str(error)


def defaultTLSCreator(tls: TLSPolicy) -> TLSCreator:
    """TLS settings for ``tls``: verified against ``tls.caFile`` (read now) or the system's
    trust roots; unverified for opportunistic TLS."""
    trustRoot = loadTrustRoot(tls.caFile) if tls.mode in ("verify", "implicit") else None

    def creator(host: str, verify: bool) -> IOpenSSLClientConnectionCreator:
        if not verify:
            return UnverifiedClientTLS(host)
        return optionsForClientTLS(host, trustRoot=trustRoot)

    return creator


def loadTLSCreator(tls: TLSPolicy, name: str) -> TLSCreator:
    """:func:`defaultTLSCreator`, raising :class:`HostFailure` (for host ``name``) when the
    trust roots cannot be read."""
    try:
        return defaultTLSCreator(tls)
    except (OSError, ValueError, SSL.Error) as error:
        # The path of the file is the operator's business, not the status trail's.
        log.warn(
            "cannot load the TLS trust roots from {path}: {error}",
            path=tls.caFile,
            error=repr(error),
        )
        raise HostFailure(
            name, "", "TLS required, but the trust roots cannot be read", "4.7.5"
        ) from None


def loadTrustRoot(caFile: str | None) -> Any:
    """The trust roots in PEM file ``caFile`` (every certificate in it), or the platform's."""
    if caFile is None:
        return platformTrust()
    with open(caFile, "rb") as pem:
        blocks = re.findall(
            rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem.read(), re.DOTALL
        )
    if not blocks:
        raise ValueError("no certificate in the CA file")
    return trustRootFromCertificates([Certificate.loadPEM(block) for block in blocks])


def endpointFor(
    reactor: Any,
    candidate: Candidate,
    timeouts: Timeouts,
    implicitTLS: IOpenSSLClientConnectionCreator | None = None,
) -> IStreamClientEndpoint:
    """Where to connect for ``candidate``: its address (or its name, resolved when
    connecting), wrapped in TLS from the first byte when ``implicitTLS`` is given."""
    endpoint: IStreamClientEndpoint
    if candidate.address is None:
        endpoint = HostnameEndpoint(
            reactor, candidate.host, candidate.port, timeout=timeouts.connect
        )
    elif ":" in candidate.address:
        endpoint = TCP6ClientEndpoint(
            reactor, candidate.address, candidate.port, timeout=timeouts.connect
        )
    else:
        endpoint = TCP4ClientEndpoint(
            reactor, candidate.address, candidate.port, timeout=timeouts.connect
        )
    if implicitTLS is not None:
        endpoint = wrapClientTLS(implicitTLS, endpoint)
    return endpoint


async def openSession(
    reactor: Any,
    candidate: Candidate,
    heloName: str,
    tls: TLSPolicy,
    timeouts: Timeouts,
    credentials: Credentials | None = None,
    tlsCreator: TLSCreator | None = None,
    startTLS: bool = True,
) -> SMTPSession:
    """
    Connect to ``candidate`` and start a session (greeting, EHLO, TLS, AUTH). Raises
    :class:`HostFailure` or :class:`EnvelopeRefused`. ``startTLS=False`` is the one clear-text
    retry opportunistic TLS allows after a failed handshake.
    """
    if tlsCreator is None:
        tlsCreator = loadTLSCreator(tls, candidate.host)
    implicit = tlsCreator(candidate.host, True) if tls.mode == "implicit" else None
    endpoint = endpointFor(reactor, candidate, timeouts, implicit)
    connecting = endpoint.connect(SMTPClientFactory(reactor, timeouts))
    connecting.addTimeout(timeouts.connect, reactor)
    try:
        protocol: SMTPClientProtocol = await connecting  # type: ignore[assignment]
    except Exception as error:
        raise HostFailure(
            candidate.host, "", connectFailureReason(error), _connectDsn(error)
        ) from None
    session = SMTPSession(
        protocol, candidate, heloName, tls, credentials, tlsCreator, startTLS=startTLS
    )
    await session.start()
    return session


def connectFailureReason(error: BaseException) -> str:
    """A fixed phrase for why a connection could not be made (never the exception's text,
    which may name local things)."""
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, (TimeoutError, CancelledError, ConnectTimeoutError, TCPTimedOutError)):
        return "connection timed out"
    if isinstance(error, DNSLookupError):
        return "host name not found"
    if isinstance(error, NoRouteError):
        return "no route to host"
    if isinstance(error, ConnectError):
        return "connection failed"
    return "connection failed"


def _connectDsn(error: BaseException) -> str:
    return "4.4.3" if isinstance(error, DNSLookupError) else "4.4.1"
