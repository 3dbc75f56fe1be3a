"""
SMTP servers for tests to deliver to, on free ports of 127.0.0.1.

- :func:`startScriptedSink` runs a Twisted ESMTP server in the test's reactor whose every reply
  can be scripted (see :class:`SinkScript`): refuse a recipient, answer the first DATA with 451,
  offer no PIPELINING, offer STARTTLS with a trustme certificate, check an AUTH password, never
  answer, send an endless reply... It records every transaction (:class:`ReceivedMessage`) and
  every command line, per connection.
- :func:`startAiosmtpdSink` runs aiosmtpd (an independent implementation) in a thread and
  records what it receives.

Both stop themselves at the test's cleanup::

    sink = await startScriptedSink(self, SinkScript(replies={"RCPT:bad@x.test": "550 5.1.1 no"}))
    ...deliver to 127.0.0.1:sink.port...
    self.assertEqual(sink.messages[0].recipients, ("good@x.test",))

:class:`SinkTLS` makes a trustme CA with a certificate for a name (``mx.test`` by default) and
127.0.0.1; ``tls.caPath(testCase)`` writes the CA for clients to trust.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from twisted.internet import reactor as globalReactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory
from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.internet.threads import deferToThread
from twisted.protocols.basic import LineReceiver
from twisted.trial.unittest import TestCase

STALL = "<stall>"
"""A scripted reply that is never sent: the server goes silent (and keeps reading)."""

ENDLESS = "<endless>"
"""A scripted reply that never ends: continuation lines ("250-...") without a last line."""

CLOSE = "<close>"
"""A scripted reply that is a closed connection."""

BROKEN_TLS = "<broken tls>"
"""A scripted reply to STARTTLS: "220", then bytes that are not TLS for the client's
handshake (which fails), then plain text again."""

_CODED = re.compile(r"\d{3}(?:[ -]|$)")


@dataclass(frozen=True)
class Delayed:
    """A scripted reply sent ``seconds`` late (a slow server); the sink acts on it at once."""

    seconds: float
    reply: str


DEFAULT_EXTENSIONS = ("PIPELINING", "8BITMIME", "SMTPUTF8", "SIZE 10485760", "ENHANCEDSTATUSCODES")


class SinkTLS:
    """A trustme CA and a server certificate for ``names`` (and 127.0.0.1)."""

    def __init__(self, *names: str) -> None:
        self.names = names or ("mx.test",)
        self.ca = trustme.CA()
        self.certificate = self.ca.issue_cert(*self.names, "127.0.0.1")

    def serverOptions(self) -> CertificateOptions:
        """Twisted server TLS settings presenting the certificate."""
        pem = self.certificate.private_key_and_cert_chain_pem.bytes()
        return PrivateCertificate.loadPEM(pem).options()

    def caPath(self, testCase: TestCase) -> str:
        """A file in the test's temp directory holding the CA certificate (PEM)."""
        path = Path(testCase.mktemp())
        path.mkdir(parents=True)
        path = path / "ca.pem"
        self.ca.cert_pem.write_to_path(str(path))
        return str(path)


@dataclass
class SinkScript:
    """
    How a :class:`ScriptedSink` answers.

    ``replies`` maps a command to its reply, overriding the default (250/354/221...):
    keys are ``"EHLO"``, ``"HELO"``, ``"MAIL"``, ``"RCPT"``, ``"RCPT:<address>"`` (one
    recipient; more specific than ``"RCPT"``), ``"DATA"`` (the reply to the DATA command),
    ``"END"`` (the reply to the end of data), ``"RSET"``, ``"STARTTLS"``, ``"AUTH"``, ``"QUIT"``,
    ``"NOOP"``. A value is a reply line (``"550 5.1.1 No such user"``; ``\\n`` separates the
    lines of a multi-line reply), :data:`STALL`, :data:`ENDLESS`, :data:`CLOSE`,
    :data:`BROKEN_TLS`, a :class:`Delayed` reply, or a list of those used one after the other
    (counted over all connections), the default after the last.

    ``greeting`` is the banner (``"554 go away"`` refuses). ``extensions`` are the EHLO
    keywords offered (STARTTLS is added when ``tls`` is given and ``implicitTLS`` is false; AUTH
    PLAIN LOGIN when ``password`` is set). ``implicitTLS``: TLS from the first byte.
    """

    replies: dict[str, Any] = field(default_factory=dict)
    greeting: str = "220 sink.test ESMTP scripted sink"
    extensions: Sequence[str] = DEFAULT_EXTENSIONS
    tls: SinkTLS | None = None
    implicitTLS: bool = False
    username: str = "relay"
    password: str | None = None
    authMechanisms: str = "PLAIN LOGIN"


@dataclass(frozen=True)
class ReceivedMessage:
    """One transaction the sink accepted (250 at the end of data)."""

    sender: str
    recipients: tuple[str, ...]
    message: bytes = field(repr=False)
    mailParameters: tuple[str, ...] = ()
    tls: bool = False
    authenticated: str | None = None
    connection: int = 0
    """Which connection (0, 1, ... in the order made) carried it."""


class _SinkProtocol(LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20
    transport: Any

    def __init__(self, sink: ScriptedSink, number: int) -> None:
        self.sink = sink
        self.number = number
        self.commands: list[str] = []
        self._data: list[bytes] | None = None
        self._stalled = False
        self._breakTLS = False
        self._authLogin: list[str] | None = None
        self._resetTransaction()
        self.authenticated: str | None = None
        self.lost: Deferred[None] = Deferred()

    def _resetTransaction(self) -> None:
        self.sender: str | None = None
        self.recipients: list[str] = []
        self.parameters: tuple[str, ...] = ()

    @property
    def script(self) -> SinkScript:
        return self.sink.script

    def connectionMade(self) -> None:
        self.sink.connections.append(self)
        self._send(self.script.greeting)

    def connectionLost(self, reason: Any = None) -> None:
        if self in self.sink._open:
            self.sink._open.remove(self)
        self.lost.callback(None)

    def dataReceived(self, data: bytes) -> None:
        if self._breakTLS:
            self._breakTLS = False
            self.transport.write(b"this is not TLS\r\n")
            return
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._data is not None:
            self._dataLine(line)
            return
        text = line.decode("utf-8", "replace")
        if self._authLogin is not None:
            self._authLoginLine(text)
            return
        self.commands.append(text)
        self.sink.commands.append((self.number, text))
        if self._stalled:
            return
        verb, _, argument = text.partition(" ")
        handler = getattr(self, f"do_{verb.upper()}", None)
        if handler is None:
            self._send("500 5.5.2 unknown command")
        else:
            handler(argument)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.transport.loseConnection()

    # -- replies

    def _send(self, reply: str | Delayed) -> None:
        if isinstance(reply, Delayed):
            call = self.sink._reactor.callLater(reply.seconds, self._send, reply.reply)
            self.sink._delayed.append(call)
        elif reply == STALL:
            self._stalled = True
        elif reply == CLOSE:
            self.transport.loseConnection()
        elif reply == BROKEN_TLS:
            self._breakTLS = True
            self.transport.write(b"220 2.0.0 go ahead\r\n")
        elif reply == ENDLESS:
            self._stalled = True
            self.transport.write(b"".join(b"250-more and more\r\n" for _ in range(1000)))
        else:
            # "250 first\nsecond\n250 third": the first line's code goes on every line.
            first, *rest = reply.split("\n")
            code = first[:3]
            texts = [first[4:], *(line[4:] if _CODED.match(line) else line for line in rest)]
            lines = [f"{code}-{text}" for text in texts[:-1]] + [f"{code} {texts[-1]}"]
            self.transport.write("".join(f"{line}\r\n" for line in lines).encode("utf-8"))

    def _reply(self, key: str, default: str, *alternatives: str) -> str:
        """The scripted reply for ``key`` (or the first alternative key scripted), else
        ``default``; sends it and returns it."""
        reply = self.sink._scripted((*alternatives, key), default)
        self._send(reply)
        return reply.reply if isinstance(reply, Delayed) else reply

    # -- commands

    def do_EHLO(self, argument: str) -> None:
        extensions = list(self.script.extensions)
        if self.script.tls is not None and not self.script.implicitTLS and not self._secure:
            extensions.append("STARTTLS")
        if self.script.password is not None:
            extensions.append(f"AUTH {self.script.authMechanisms}")
        self._resetTransaction()
        self._reply("EHLO", "\n".join(["250 sink.test", *extensions]))

    def do_HELO(self, argument: str) -> None:
        self._resetTransaction()
        self._reply("HELO", "250 sink.test")

    def do_STARTTLS(self, argument: str) -> None:
        if self._secure:
            self._send("502 5.5.1 TLS is on already")
            return
        default = "502 5.5.1 no STARTTLS here" if self.script.tls is None else "220 2.0.0 go"
        reply = self._reply("STARTTLS", default)
        if reply.startswith("220") and self.script.tls is not None:
            self._resetTransaction()
            self.transport.startTLS(self.script.tls.serverOptions())

    def do_AUTH(self, argument: str) -> None:
        mechanism, _, initial = argument.partition(" ")
        if mechanism.upper() == "PLAIN" and initial:
            try:
                _, user, password = base64.b64decode(initial).decode().split("\0")
            except (ValueError, binascii.Error):
                self._send("501 5.5.2 bad PLAIN response")
                return
            self._checkPassword(user, password)
        elif mechanism.upper() == "LOGIN":
            self._authLogin = []
            self._send("334 VXNlcm5hbWU6")
        else:
            self._send("504 5.5.4 mechanism not supported")

    def _authLoginLine(self, text: str) -> None:
        assert self._authLogin is not None
        try:
            self._authLogin.append(base64.b64decode(text).decode())
        except (ValueError, binascii.Error):
            self._authLogin = None
            self._send("501 5.5.2 bad LOGIN response")
            return
        if len(self._authLogin) == 1:
            self._send("334 UGFzc3dvcmQ6")
        else:
            user, password = self._authLogin
            self._authLogin = None
            self._checkPassword(user, password)

    def _checkPassword(self, user: str, password: str) -> None:
        if user == self.script.username and password == self.script.password:
            if self._reply("AUTH", "235 2.7.0 authenticated").startswith("235"):
                self.authenticated = user
        else:
            self._send("535 5.7.8 authentication credentials invalid")

    def do_MAIL(self, argument: str) -> None:
        address, parameters = _pathAndParameters(argument, "FROM:")
        if address is None:
            self._send("501 5.5.4 syntax: MAIL FROM:<address>")
            return
        if self._reply("MAIL", "250 2.1.0 ok").startswith("2"):
            self.sender = address
            self.parameters = parameters
            self.recipients = []

    def do_RCPT(self, argument: str) -> None:
        address, _ = _pathAndParameters(argument, "TO:")
        if address is None:
            self._send("501 5.5.4 syntax: RCPT TO:<address>")
            return
        if self.sender is None:
            self._send("503 5.5.1 MAIL first")
            return
        if self._reply("RCPT", "250 2.1.5 ok", f"RCPT:{address}").startswith("2"):
            self.recipients.append(address)

    def do_DATA(self, argument: str) -> None:
        if not self.recipients:
            self._send("554 5.5.1 no valid recipients")
            return
        if self._reply("DATA", "354 end with <CRLF>.<CRLF>").startswith("354"):
            self._data = []

    def _dataLine(self, line: bytes) -> None:
        assert self._data is not None
        if line == b".":
            message = b"".join(part + b"\r\n" for part in self._data)
            self._data = None
            if self._reply("END", "250 2.0.0 queued").startswith("2"):
                assert self.sender is not None
                self.sink.messages.append(
                    ReceivedMessage(
                        self.sender,
                        tuple(self.recipients),
                        message,
                        self.parameters,
                        self._secure,
                        self.authenticated,
                        self.number,
                    )
                )
            self._resetTransaction()
            return
        self._data.append(line[1:] if line.startswith(b".") else line)

    def do_RSET(self, argument: str) -> None:
        self._resetTransaction()
        self._reply("RSET", "250 2.0.0 ok")

    def do_NOOP(self, argument: str) -> None:
        self._reply("NOOP", "250 2.0.0 ok")

    def do_QUIT(self, argument: str) -> None:
        self._reply("QUIT", "221 2.0.0 bye")
        self.transport.loseConnection()

    @property
    def _secure(self) -> bool:
        return ISSLTransport.providedBy(self.transport)


def _pathAndParameters(argument: str, prefix: str) -> tuple[str | None, tuple[str, ...]]:
    if not argument.upper().startswith(prefix):
        return None, ()
    rest = argument[len(prefix) :].strip()
    if not rest.startswith("<") or ">" not in rest:
        return None, ()
    address, _, parameters = rest[1:].partition(">")
    return address, tuple(parameters.split())


class _SinkFactory(Factory):
    def __init__(self, sink: ScriptedSink) -> None:
        self.sink = sink

    def buildProtocol(self, addr: Any) -> _SinkProtocol:
        protocol = _SinkProtocol(self.sink, len(self.sink.connections))
        self.sink._open.append(protocol)
        return protocol


class ScriptedSink:
    """
    The scripted server. After :meth:`start`: ``port``; as it runs: ``messages`` (accepted
    transactions, in order), ``connections`` (one protocol per connection made, each with
    its ``commands``), ``commands`` ((connection number, command line) in order).
    """

    def __init__(self, script: SinkScript | None = None, reactor: Any = globalReactor) -> None:
        self.script = script or SinkScript()
        self._reactor = reactor
        self.port = 0
        self.messages: list[ReceivedMessage] = []
        self.connections: list[_SinkProtocol] = []
        self.commands: list[tuple[int, str]] = []
        self._open: list[_SinkProtocol] = []
        self._listening: Any = None
        self._used: dict[str, Iterator[Any]] = {}
        self._delayed: list[Any] = []

    def start(self) -> None:
        factory = _SinkFactory(self)
        if self.script.implicitTLS:
            assert self.script.tls is not None, "implicit TLS needs a SinkTLS"
            self._listening = self._reactor.listenSSL(
                0, factory, self.script.tls.serverOptions(), interface="127.0.0.1"
            )
        else:
            self._listening = self._reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port = self._listening.getHost().port

    def stop(self) -> Deferred[Any]:
        """Stop listening and drop every connection still open."""
        waiting = []
        for call in self._delayed:
            if call.active():
                call.cancel()
        for protocol in list(self._open):
            protocol.transport.abortConnection()
            waiting.append(protocol.lost)
        if self._listening is not None:
            waiting.append(self._listening.stopListening())
            self._listening = None
        return DeferredList(waiting)

    def _scripted(self, keys: Sequence[str], default: str) -> str | Delayed:
        for key in keys:
            if key in self.script.replies:
                value = self.script.replies[key]
                if isinstance(value, (str, Delayed)):
                    return value
                iterator = self._used.setdefault(key, iter(value))
                return next(iterator, default)
        return default

    @property
    def transactionCommands(self) -> list[str]:
        """Every command's verb, in the order received (all connections): to see RSETs."""
        return [line.split(" ", 1)[0].upper() for _, line in self.commands]


async def startScriptedSink(
    testCase: TestCase, script: SinkScript | None = None, **scriptFields: Any
) -> ScriptedSink:
    """A listening :class:`ScriptedSink` (``script``, or a SinkScript of ``scriptFields``),
    stopped at the test's cleanup."""
    sink = ScriptedSink(script or SinkScript(**scriptFields))
    sink.start()
    testCase.addCleanup(sink.stop)
    return sink


@dataclass(frozen=True)
class AiosmtpdMessage:
    sender: str
    recipients: tuple[str, ...]
    message: bytes = field(repr=False)
    mailOptions: tuple[str, ...] = ()


class _RecordingHandler:
    def __init__(self, messages: list[AiosmtpdMessage]) -> None:
        self.messages = messages

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(
            AiosmtpdMessage(
                envelope.mail_from,
                tuple(envelope.rcpt_tos),
                envelope.original_content or envelope.content,
                tuple(envelope.mail_options),
            )
        )
        return "250 2.0.0 Message accepted"


class _AnyPortController(Controller):
    """aiosmtpd's Controller on port 0: the port is read from the socket before the
    controller's own check connects to it."""

    def _trigger_server(self) -> None:
        server: Any = self.server
        self.port = server.sockets[0].getsockname()[1]
        super()._trigger_server()


class AiosmtpdSink:
    """aiosmtpd in a thread. After :meth:`start`: ``port``; ``messages`` as it receives."""

    def __init__(self, **smtpParameters: Any) -> None:
        self.messages: list[AiosmtpdMessage] = []
        self.controller = _AnyPortController(
            _RecordingHandler(self.messages), hostname="127.0.0.1", port=0, **smtpParameters
        )
        self.port = 0

    def start(self) -> Deferred[None]:
        def started(_: object) -> None:
            self.port = self.controller.port

        return deferToThread(self.controller.start).addCallback(started)

    def stop(self) -> Deferred[None]:
        return deferToThread(self.controller.stop)


async def startAiosmtpdSink(testCase: TestCase, **smtpParameters: Any) -> AiosmtpdSink:
    """A running :class:`AiosmtpdSink`, stopped at the test's cleanup. ``smtpParameters`` go
    to aiosmtpd's ``SMTP`` (e.g. ``data_size_limit``, ``enable_SMTPUTF8``)."""
    sink = AiosmtpdSink(**smtpParameters)
    await sink.start()
    testCase.addCleanup(sink.stop)
    return sink
