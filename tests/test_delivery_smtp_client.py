"""
The outbound ESMTP client: the reply parser, the wire protocol on a StringTransport with a
task.Clock (timeouts, pipelining, STARTTLS), and whole deliveries over real sockets to the
scripted sink and to aiosmtpd.
"""

from __future__ import annotations

import socket
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailrelay.delivery.route import Candidate, Credentials, TLSPolicy
from mailrelay.delivery.smtp.client import (
    ConnectionClosed,
    Envelope,
    HostFailure,
    RecipientOutcome,
    SMTPClientProtocol,
    SMTPSession,
    Timeouts,
    UnverifiedClientTLS,
    dotStuff,
)
from mailrelay.delivery.smtp.pool import SMTPClientPool
from mailrelay.delivery.smtp.reply import (
    MAX_LINE,
    MAX_LINES,
    ReplyParser,
    SMTPProtocolError,
    SMTPReply,
)
from tests.smtp_sinks import (
    BROKEN_TLS,
    DEFAULT_EXTENSIONS,
    ENDLESS,
    STALL,
    SinkTLS,
    startAiosmtpdSink,
    startScriptedSink,
)

MESSAGE = b"From: app@acme.example\r\nTo: a@dest.test\r\nSubject: hi\r\n\r\nHello.\r\n.dot line\r\n"
SENDER = "app@acme.example"
FAST = Timeouts(connect=5.0, command=5.0, data=5.0)
NO_TLS = TLSPolicy("none")


# -- the reply parser


class ReplyParserTests(SynchronousTestCase):
    def test_singleLine(self) -> None:
        (reply,) = ReplyParser().feed(b"250 2.1.0 Ok\r\n")
        self.assertEqual(reply, SMTPReply(250, ("2.1.0 Ok",)))
        self.assertEqual(reply.enhanced, "2.1.0")
        self.assertEqual(reply.text, "250 2.1.0 Ok")
        self.assertTrue(reply.isPositive)

    def test_multiLineInPieces(self) -> None:
        parser = ReplyParser()
        self.assertEqual(parser.feed(b"250-mx.example.net\r\n250-PIPE"), [])
        (reply,) = parser.feed(b"LINING\r\n250 SIZE 1000\r\n")
        self.assertEqual(reply.lines, ("mx.example.net", "PIPELINING", "SIZE 1000"))
        self.assertIsNone(reply.enhanced)

    def test_severalRepliesAtOnce(self) -> None:
        replies = ReplyParser().feed(b"250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
        self.assertEqual([r.code for r in replies], [250, 550, 354])
        self.assertTrue(replies[1].isPermanent)

    def test_bareCodeAndBareLF(self) -> None:
        (reply,) = ReplyParser().feed(b"250\n")
        self.assertEqual(reply.lines, ("",))
        self.assertEqual(reply.text, "250")

    def test_textJoinsLinesDropsRepeatedCodeAndControls(self) -> None:
        reply = SMTPReply(550, ("5.1.1 The account\x1b[31m", "5.1.1 does not exist"))
        self.assertEqual(reply.text, "550 5.1.1 The account[31m does not exist")
        self.assertLessEqual(len(SMTPReply(550, ("x" * 2000,)).text), 500)

    def test_temporary(self) -> None:
        reply = SMTPReply(451, ("4.3.0 later",))
        self.assertTrue(reply.isTemporary)
        self.assertFalse(reply.isPermanent or reply.isPositive)

    def test_malformed(self) -> None:
        for data in [b"hello\r\n", b"25 ok\r\n", b"650 no\r\n", b"250x\r\n"]:
            self.assertRaises(SMTPProtocolError, ReplyParser().feed, data)

    def test_codeChangesWithinReply(self) -> None:
        self.assertRaises(SMTPProtocolError, ReplyParser().feed, b"250-a\r\n251 b\r\n")

    def test_lineTooLong(self) -> None:
        parser = ReplyParser()
        self.assertRaises(SMTPProtocolError, parser.feed, b"250 " + b"x" * MAX_LINE)
        self.assertRaises(SMTPProtocolError, parser.feed, b"250 ok\r\n")  # stays failed

    def test_lineTooLongWithEnd(self) -> None:
        self.assertRaises(
            SMTPProtocolError, ReplyParser().feed, b"250 " + b"x" * MAX_LINE + b"\r\n"
        )

    def test_tooManyLines(self) -> None:
        data = b"250-x\r\n" * MAX_LINES + b"250 x\r\n"
        self.assertRaises(SMTPProtocolError, ReplyParser().feed, data)
        (reply,) = ReplyParser().feed(b"250-x\r\n" * (MAX_LINES - 1) + b"250 x\r\n")
        self.assertEqual(len(reply.lines), MAX_LINES)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.binary(max_size=3000), max_size=20))
    def test_fuzzArbitraryBytes(self, chunks: list[bytes]) -> None:
        """Whatever the server sends: replies or SMTPProtocolError, and bounded buffering."""
        parser = ReplyParser()
        for chunk in chunks:
            try:
                parser.feed(chunk)
            except SMTPProtocolError:
                return
            self.assertLessEqual(parser.buffered, (MAX_LINE + 2) * (MAX_LINES + 1))

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from([b"250", b"354", b"421", b"550", b"251"]),
                st.sampled_from([b"-", b" ", b""]),
                st.binary(max_size=80).filter(lambda b: b"\n" not in b),
            ),
            max_size=150,
        ),
        st.integers(min_value=1, max_value=50),
    )
    def test_fuzzReplyShapedLines(self, lines: list[tuple[bytes, bytes, bytes]], cut: int) -> None:
        data = b"".join(code + sep + (text if sep else b"") + b"\r\n" for code, sep, text in lines)
        parser = ReplyParser()
        try:
            for start in range(0, len(data), cut):
                for reply in parser.feed(data[start : start + cut]):
                    self.assertLessEqual(len(reply.lines), MAX_LINES)
                    self.assertLessEqual(len(reply.text), 500)
                    self.assertNotIn("\n", reply.text)
        except SMTPProtocolError:
            pass


class DotStuffTests(SynchronousTestCase):
    def test_stuffing(self) -> None:
        self.assertEqual(dotStuff(b".a\r\nb\r\n.\r\n..c\r\n"), b"..a\r\nb\r\n..\r\n...c\r\n")

    def test_bareLineEndsBecomeCRLF(self) -> None:
        # SMTP smuggling: a bare LF followed by ".\r\n" must not end the data anywhere.
        self.assertEqual(dotStuff(b"a\n.\r\nb\rc"), b"a\r\n..\r\nb\r\nc\r\n")

    def test_empty(self) -> None:
        self.assertEqual(dotStuff(b""), b"")


# -- the protocol and session on a StringTransport


class TLSRecordingTransport(StringTransport):
    """StringTransport that records startTLS (whose handshake then never finishes)."""

    tlsStarted: Any = None

    def startTLS(self, creator: Any) -> None:
        self.tlsStarted = creator


class ConversationTests(SynchronousTestCase):
    """The session's side of a conversation, the server's lines written by the test."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.protocol = SMTPClientProtocol(self.clock, Timeouts(connect=30, command=300, data=600))
        self.transport = TLSRecordingTransport()
        self.protocol.makeConnection(self.transport)

    def session(self, tls: TLSPolicy = NO_TLS, **kwargs: Any) -> SMTPSession:
        return SMTPSession(
            self.protocol,
            Candidate("mx.example.net", "192.0.2.1", 25),
            "relay.test",
            tls,
            tlsCreator=lambda host, verify: UnverifiedClientTLS(host),
            **kwargs,
        )

    def server(self, data: bytes) -> list[bytes]:
        """Deliver the server's ``data``; the client's lines written since the last call."""
        self.transport.clear()
        self.protocol.dataReceived(data)
        return self.transport.value().splitlines()

    def start(self, session: SMTPSession, ehlo: bytes = b"250-mx\r\n250 PIPELINING\r\n") -> None:
        started = Deferred.fromCoroutine(session.start())
        self.assertEqual(self.server(b"220 mx ESMTP\r\n"), [b"EHLO relay.test"])
        self.server(ehlo)
        self.successResultOf(started)

    def failure(self, d: Deferred[Any]) -> HostFailure:
        error = self.failureResultOf(d, HostFailure).value
        assert isinstance(error, HostFailure)
        return error

    def test_stalledGreetingTimesOut(self) -> None:
        started = Deferred.fromCoroutine(self.session().start())
        self.clock.advance(299)
        self.assertNoResult(started)
        self.clock.advance(1)
        failure = self.failure(started)
        self.assertEqual(failure.dsnCode, "4.4.2")
        self.assertIn("timed out", failure.reason)
        self.assertEqual(failure.host, "")
        self.assertTrue(self.transport.disconnecting)

    def test_repliesReadTogetherAreAnsweredTogether(self) -> None:
        """Replies that come in one read are all answered before the first one's waiter
        runs, so a caller going through a pipeline's replies in order never waits on the
        next; each still gets its own reply, in order."""
        self.server(b"220 mx ESMTP\r\n")
        replies = self.protocol.pipeline(["MAIL FROM:<a@x>", "RCPT TO:<b@y>", "DATA"])
        seenByTheFirst: list[bool] = []

        def first(reply: SMTPReply) -> SMTPReply:
            seenByTheFirst.extend(d.called for d in replies)
            return reply

        replies[0].addCallback(first)
        self.protocol.dataReceived(b"250 ok\r\n250 2.1.5 ok\r\n354 go on\r\n")
        self.assertEqual(seenByTheFirst, [True, True, True])
        self.assertEqual([self.successResultOf(d).code for d in replies], [250, 250, 354])

    def test_repliesReadApartAreAnsweredInTurn(self) -> None:
        self.server(b"220 mx ESMTP\r\n")
        replies = self.protocol.pipeline(["MAIL FROM:<a@x>", "RCPT TO:<b@y>"])
        self.protocol.dataReceived(b"250 ok\r\n")
        self.assertEqual(self.successResultOf(replies[0]).code, 250)
        self.assertNoResult(replies[1])
        self.protocol.dataReceived(b"550 no\r\n")
        self.assertEqual(self.successResultOf(replies[1]).code, 550)

    def test_tricklingReplyTimesOut(self) -> None:
        """A reply must be complete within the timeout, however many bytes come."""
        started = Deferred.fromCoroutine(self.session().start())
        for _ in range(10):
            self.clock.advance(50)
            self.protocol.dataReceived(b"2")
        self.failure(started)

    def test_greeting554(self) -> None:
        started = Deferred.fromCoroutine(self.session().start())
        self.server(b"554 5.7.1 no service for you\r\n")
        failure = self.failure(started)
        self.assertTrue(failure.permanent)
        self.assertEqual((failure.remoteCode, failure.dsnCode), (554, "5.7.1"))
        self.assertEqual(
            failure.outcome("a@x").reply, "mx.example.net: 554 5.7.1 no service for you"
        )

    def test_ehloRefusedThenHelo(self) -> None:
        session = self.session()
        started = Deferred.fromCoroutine(session.start())
        self.server(b"220 mx\r\n")
        self.assertEqual(self.server(b"502 5.5.1 what?\r\n"), [b"HELO relay.test"])
        self.server(b"250 mx\r\n")
        self.successResultOf(started)
        self.assertFalse(session.esmtp)
        self.assertEqual(session.capabilities, {})

    def test_pipelinedTransaction(self) -> None:
        session = self.session()
        self.start(session, b"250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
        self.transport.clear()
        sent = Deferred.fromCoroutine(session.transact(SENDER, ["a@x", "b@x"], b"Hi\r\n"))
        self.assertEqual(
            self.transport.value(),
            b"MAIL FROM:<app@acme.example>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n",
        )
        lines = self.server(b"250 ok\r\n550 5.1.1 no such user\r\n250 ok\r\n354 go\r\n")
        self.assertEqual(lines, [b"Hi", b"."])
        self.server(b"250 2.0.0 queued as X\r\n")
        failed, delivered = self.successResultOf(sent)
        self.assertEqual(
            failed,
            RecipientOutcome(
                "a@x", "failed", "mx.example.net: 550 5.1.1 no such user", "mx.example.net",
                "5.1.1", 550,
            ),
        )  # fmt: skip
        self.assertEqual((delivered.kind, delivered.dsnCode), ("delivered", "2.0.0"))

    def test_pipelinedNoRecipientAccepted(self) -> None:
        session = self.session()
        self.start(session)
        sent = Deferred.fromCoroutine(session.transact(SENDER, ["a@x"], b"Hi\r\n"))
        self.assertEqual(self.server(b"250 ok\r\n450 4.2.0 later\r\n354 go\r\n"), [b"."])
        self.assertEqual(self.server(b"554 no recipients\r\n"), [b"RSET"])
        self.server(b"250 ok\r\n")
        (outcome,) = self.successResultOf(sent)
        self.assertEqual((outcome.kind, outcome.dsnCode), ("deferred", "4.2.0"))
        self.assertTrue(session.usable)

    def test_dataReplyTimeoutIsTheDataTimeout(self) -> None:
        session = self.session()
        self.start(session, b"250 mx\r\n")
        sent = Deferred.fromCoroutine(session.transact(SENDER, ["a@x"], b"Hi\r\n"))
        self.server(b"250 ok\r\n")
        self.server(b"250 ok\r\n")
        self.server(b"354 go\r\n")
        self.clock.advance(599)
        self.assertNoResult(sent)
        self.clock.advance(1)
        failure = self.failure(sent)
        self.assertIn("end of data", failure.reason)
        self.assertEqual(failure.host, "mx.example.net")

    def test_commandAfterDataTimesOutOnTheCommandTimeout(self) -> None:
        """After the end of data (600 s) the next command's timer fires sooner (300 s)."""
        session = self.session()
        self.start(session)
        sent = Deferred.fromCoroutine(session.transact(SENDER, ["a@x"], b"Hi\r\n"))
        self.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.server(b"250 2.0.0 queued\r\n")
        self.successResultOf(sent)
        reset = Deferred.fromCoroutine(session.reset())
        self.clock.advance(299)
        self.assertNoResult(reset)
        self.clock.advance(1)
        self.assertFalse(self.successResultOf(reset))
        self.assertTrue(self.transport.disconnecting)

    def test_oneTimerForAConversation(self) -> None:
        """Replies move the one timer later instead of making a timer each; with nothing
        awaited it runs out without a word, and the next command is timed afresh."""
        session = self.session()
        self.start(session)
        for _ in range(3):
            sent = Deferred.fromCoroutine(session.transact(SENDER, ["a@x"], b"Hi\r\n"))
            self.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
            self.clock.advance(100)
            self.server(b"250 2.0.0 queued\r\n")
            self.successResultOf(sent)
            self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(1000)  # idle: the left-over timer runs out unheeded
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.transport.disconnecting)
        self.assertTrue(session.usable)
        reset = Deferred.fromCoroutine(session.reset())
        self.clock.advance(300)
        self.assertFalse(self.successResultOf(reset))

    def test_421AnywhereIsTheHosts(self) -> None:
        session = self.session()
        self.start(session)
        sent = Deferred.fromCoroutine(session.transact(SENDER, ["a@x", "b@x"], b"Hi\r\n"))
        self.server(b"250 ok\r\n550 no\r\n421 4.3.2 shutting down\r\n")
        failure = self.failure(sent)
        self.assertEqual(failure.remoteCode, 421)
        self.assertEqual([o.recipient for o in failure.decided], [])
        self.assertTrue(self.transport.disconnecting)

    def test_mail5xxRefusesEnvelope(self) -> None:
        from mailrelay.delivery.smtp.client import EnvelopeRefused

        session = self.session()
        self.start(session, b"250 mx\r\n")
        sent = Deferred.fromCoroutine(session.transact(SENDER, ["a@x"], b"Hi\r\n"))
        self.server(b"553 5.7.1 sender rejected\r\n")
        refused = self.failureResultOf(sent, EnvelopeRefused).value
        assert isinstance(refused, EnvelopeRefused)
        self.assertEqual(refused.outcome("a@x").kind, "failed")

    def test_endlessReplyIsAProtocolError(self) -> None:
        started = Deferred.fromCoroutine(self.session().start())
        self.server(b"220 mx\r\n")
        self.server(b"250-more\r\n" * 150)
        failure = self.failure(started)
        self.assertIn("protocol error", failure.reason)
        self.assertTrue(self.transport.disconnecting)

    def test_unexpectedReplyClosesTheConnection(self) -> None:
        session = self.session()
        self.start(session)
        self.server(b"421 4.4.2 idle timeout\r\n")
        self.assertFalse(session.usable)

    def test_startTLSHandshakeThatNeverFinishesTimesOut(self) -> None:
        session = self.session(TLSPolicy("verify"))
        started = Deferred.fromCoroutine(session.start())
        self.server(b"220 mx\r\n")
        self.assertEqual(self.server(b"250-mx\r\n250 STARTTLS\r\n"), [b"STARTTLS"])
        self.server(b"220 go ahead\r\n")
        self.assertIsNotNone(self.transport.tlsStarted)
        self.clock.advance(300)
        failure = self.failure(started)
        self.assertTrue(failure.tlsFailure)
        self.assertEqual(failure.reason, "TLS required, but TLS handshake timed out")

    def test_startTLSThenEhloAgain(self) -> None:
        session = self.session(TLSPolicy("opportunistic"))
        started = Deferred.fromCoroutine(session.start())
        self.server(b"220 mx\r\n")
        self.server(b"250-mx\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n")
        self.transport.clear()
        self.server(b"220 go ahead\r\n")
        self.protocol.handshakeCompleted()
        self.assertEqual(self.transport.value(), b"EHLO relay.test\r\n")
        self.server(b"250-mx\r\n250 SIZE 100\r\n")
        self.successResultOf(started)
        self.assertTrue(session.secure)
        self.assertEqual(session.capabilities, {"SIZE": "100"})

    def test_startTLSInjectionRefused(self) -> None:
        """Bytes sent with the 220 to STARTTLS are not taken as if TLS protected them."""
        session = self.session(TLSPolicy("opportunistic"))
        started = Deferred.fromCoroutine(session.start())
        self.server(b"220 mx\r\n")
        self.server(b"250-mx\r\n250 STARTTLS\r\n")
        self.server(b"220 go ahead\r\n250-mx\r\n250 AUTH PLAIN\r\n")
        self.assertTrue(self.failure(started).tlsFailure)

    def test_verifyWithoutStartTLS(self) -> None:
        started = Deferred.fromCoroutine(self.session(TLSPolicy("verify")).start())
        self.server(b"220 mx\r\n")
        self.server(b"250-mx\r\n250 PIPELINING\r\n")
        failure = self.failure(started)
        self.assertEqual(failure.reason, "TLS required, but STARTTLS was not offered")
        self.assertEqual(failure.outcome("a@x").dsnCode, "4.7.10")
        self.assertTrue(self.transport.disconnecting)

    def test_authNeedsTLS(self) -> None:
        session = self.session(TLSPolicy("opportunistic"), credentials=Credentials("u", "p"))
        started = Deferred.fromCoroutine(session.start())
        self.server(b"220 mx\r\n")
        self.assertEqual(self.server(b"250-mx\r\n250 AUTH PLAIN LOGIN\r\n"), [])
        self.assertIn("TLS", self.failure(started).reason)

    def test_authLogin(self) -> None:
        session = self.session(credentials=Credentials("user", "secret"))
        started = Deferred.fromCoroutine(session.start())
        self.server(b"220 mx\r\n")
        self.assertEqual(self.server(b"250-mx\r\n250 AUTH LOGIN\r\n"), [b"AUTH LOGIN"])
        self.assertEqual(self.server(b"334 VXNlcm5hbWU6\r\n"), [b"dXNlcg=="])
        self.assertEqual(self.server(b"334 UGFzc3dvcmQ6\r\n"), [b"c2VjcmV0"])
        self.server(b"235 ok\r\n")
        self.successResultOf(started)

    def test_connectionLost(self) -> None:
        session = self.session()
        self.start(session)
        sent = Deferred.fromCoroutine(session.transact(SENDER, ["a@x"], b"Hi\r\n"))
        self.protocol.connectionLost(Failure(ConnectionClosed()))
        failure = self.failure(sent)
        self.assertEqual(failure.dsnCode, "4.4.2")
        self.assertIn("lost connection", failure.reason)


# -- deliveries over real sockets


def closedPort() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class DeliveryTestsMixin:
    """Helpers for tests delivering through a real SMTPClientPool."""

    def pool(self: Any, **kwargs: Any) -> SMTPClientPool:
        kwargs.setdefault("timeouts", FAST)
        pool = SMTPClientPool(reactor, "relay.test", **kwargs)
        self.addCleanup(pool.close)
        return pool

    async def deliver(
        self: Any,
        port: int,
        recipients: tuple[str, ...] = ("a@dest.test",),
        tls: TLSPolicy = NO_TLS,
        message: bytes = MESSAGE,
        sender: str = SENDER,
        pool: SMTPClientPool | None = None,
        candidates: tuple[Candidate, ...] | None = None,
        credentials: Credentials | None = None,
        host: str = "mx.test",
    ) -> list[RecipientOutcome]:
        pool = pool or self.pool()
        candidates = candidates or (Candidate(host, "127.0.0.1", port),)
        envelope = Envelope(sender, recipients, message)
        return await pool.deliver("dest.test", candidates, tls, envelope, credentials)


class DeliveryTests(DeliveryTestsMixin, TestCase):
    async def test_plainToScriptedSink(self) -> None:
        sink = await startScriptedSink(self)
        (outcome,) = await self.deliver(sink.port, ("a@dest.test",))
        self.assertEqual(outcome.kind, "delivered")
        self.assertEqual(outcome.reply, "mx.test: 250 2.0.0 queued")
        self.assertEqual(
            (outcome.host, outcome.dsnCode, outcome.remoteCode), ("mx.test", "2.0.0", 250)
        )
        (received,) = sink.messages
        self.assertEqual(received.sender, SENDER)
        self.assertEqual(received.recipients, ("a@dest.test",))
        self.assertEqual(received.message, MESSAGE)
        self.assertEqual(received.mailParameters, (f"SIZE={len(MESSAGE)}",))
        self.assertFalse(received.tls)

    async def test_plainToAiosmtpd(self) -> None:
        sink = await startAiosmtpdSink(self)
        outcomes = await self.deliver(sink.port, ("a@dest.test", "b@dest.test"))
        self.assertEqual([o.kind for o in outcomes], ["delivered", "delivered"])
        (received,) = sink.messages
        self.assertEqual(received.recipients, ("a@dest.test", "b@dest.test"))
        self.assertEqual(received.message, MESSAGE)

    async def test_nullSenderAndDuplicateRecipients(self) -> None:
        sink = await startScriptedSink(self)
        outcomes = await self.deliver(sink.port, ("a@dest.test", "a@dest.test"), sender="")
        self.assertEqual([o.kind for o in outcomes], ["delivered", "delivered"])
        self.assertEqual(sink.messages[0].recipients, ("a@dest.test",))
        self.assertEqual(sink.messages[0].sender, "")

    async def test_oneRecipientRefused(self) -> None:
        sink = await startScriptedSink(
            self, replies={"RCPT:bad@dest.test": "550 5.1.1 No such user"}
        )
        bad, good = await self.deliver(sink.port, ("bad@dest.test", "good@dest.test"))
        self.assertEqual(
            bad,
            RecipientOutcome(
                "bad@dest.test", "failed", "mx.test: 550 5.1.1 No such user", "mx.test",
                "5.1.1", 550,
            ),
        )  # fmt: skip
        self.assertEqual(good.kind, "delivered")
        self.assertEqual(sink.messages[0].recipients, ("good@dest.test",))

    async def test_everyRecipientRefusedSendsNoData(self) -> None:
        sink = await startScriptedSink(
            self, replies={"RCPT": "450 4.2.1 mailbox busy"}, extensions=()
        )
        (outcome,) = await self.deliver(sink.port)
        self.assertEqual((outcome.kind, outcome.dsnCode), ("deferred", "4.2.1"))
        self.assertEqual(sink.messages, [])
        self.assertNotIn("DATA", sink.transactionCommands)

    async def test_dataDeferredThenDelivered(self) -> None:
        sink = await startScriptedSink(self, replies={"END": ["451 4.3.0 try again later"]})
        pool = self.pool()
        (first,) = await self.deliver(sink.port, pool=pool)
        self.assertEqual(first.kind, "deferred")
        self.assertEqual(first.reply, "mx.test: 451 4.3.0 try again later")
        (second,) = await self.deliver(sink.port, pool=pool)
        self.assertEqual(second.kind, "delivered")
        self.assertEqual(len(sink.messages), 1)

    async def test_dataCommandRefused(self) -> None:
        sink = await startScriptedSink(self, replies={"DATA": "554 5.6.0 no thanks"})
        outcomes = await self.deliver(sink.port, ("a@dest.test", "b@dest.test"))
        self.assertEqual([(o.kind, o.dsnCode) for o in outcomes], [("failed", "5.6.0")] * 2)

    async def test_ehloRefusedHelo(self) -> None:
        sink = await startScriptedSink(self, replies={"EHLO": "502 5.5.1 EHLO not here"})
        (outcome,) = await self.deliver(sink.port)
        self.assertEqual(outcome.kind, "delivered")
        self.assertEqual(sink.transactionCommands[:3], ["EHLO", "HELO", "MAIL"])
        self.assertEqual(sink.messages[0].mailParameters, ())

    async def test_noPipelining(self) -> None:
        sink = await startScriptedSink(
            self,
            extensions=("8BITMIME",),
            replies={"RCPT:bad@dest.test": "550 5.1.1 No such user"},
        )
        outcomes = await self.deliver(sink.port, ("a@dest.test", "bad@dest.test"))
        self.assertEqual([o.kind for o in outcomes], ["delivered", "failed"])
        self.assertEqual(sink.messages[0].recipients, ("a@dest.test",))

    async def test_sizeLimit(self) -> None:
        sink = await startScriptedSink(self, extensions=("PIPELINING", "SIZE 100"))
        (outcome,) = await self.deliver(sink.port, message=b"x" * 200 + b"\r\n")
        self.assertEqual(
            (outcome.kind, outcome.dsnCode, outcome.remoteCode), ("failed", "5.3.4", 0)
        )
        self.assertIn("mx.test: message size 202 exceeds size limit 100", outcome.reply)
        self.assertNotIn("MAIL", sink.transactionCommands)

    async def test_eightBitWithout8BITMIME(self) -> None:
        sink = await startScriptedSink(self, extensions=("PIPELINING",))
        (outcome,) = await self.deliver(sink.port, message="Hé\r\n".encode())
        self.assertEqual((outcome.kind, outcome.dsnCode), ("failed", "5.6.3"))
        self.assertEqual(sink.messages, [])

    async def test_eightBitWith8BITMIME(self) -> None:
        sink = await startScriptedSink(self)
        message = "Subject: é\r\n\r\nHé\r\n".encode()
        (outcome,) = await self.deliver(sink.port, message=message)
        self.assertEqual(outcome.kind, "delivered")
        self.assertIn("BODY=8BITMIME", sink.messages[0].mailParameters)
        self.assertEqual(sink.messages[0].message, message)

    async def test_smtputf8(self) -> None:
        sink = await startScriptedSink(self)
        (outcome,) = await self.deliver(sink.port, ("jörg@dest.test",))
        self.assertEqual(outcome.kind, "delivered")
        self.assertEqual(sink.messages[0].recipients, ("jörg@dest.test",))
        self.assertIn("SMTPUTF8", sink.messages[0].mailParameters)

    async def test_smtputf8ToAiosmtpd(self) -> None:
        sink = await startAiosmtpdSink(self)
        (outcome,) = await self.deliver(sink.port, ("jörg@dest.test",))
        self.assertEqual(outcome.kind, "delivered")
        self.assertEqual(sink.messages[0].recipients, ("jörg@dest.test",))

    async def test_smtputf8NotOffered(self) -> None:
        sink = await startScriptedSink(self, extensions=("PIPELINING", "8BITMIME"))
        (outcome,) = await self.deliver(sink.port, ("jörg@dest.test",))
        self.assertEqual((outcome.kind, outcome.dsnCode), ("failed", "5.6.7"))

    async def test_unsafeAddresses(self) -> None:
        sink = await startScriptedSink(self)
        bad, good = await self.deliver(sink.port, ("a@x\r\nDATA", "b@dest.test"))
        self.assertEqual((bad.kind, bad.dsnCode), ("failed", "5.1.3"))
        self.assertEqual(good.kind, "delivered")

    async def test_mail5xxFailsEveryone(self) -> None:
        sink = await startScriptedSink(self, replies={"MAIL": "550 5.7.1 sender refused"})
        outcomes = await self.deliver(sink.port, ("a@dest.test", "b@dest.test"))
        self.assertEqual([(o.kind, o.remoteCode) for o in outcomes], [("failed", 550)] * 2)

    async def test_mail4xxTriesTheNextHost(self) -> None:
        busy = await startScriptedSink(self, replies={"MAIL": "451 4.3.2 busy"})
        good = await startScriptedSink(self)
        candidates = (
            Candidate("mx1.test", "127.0.0.1", busy.port),
            Candidate("mx2.test", "127.0.0.1", good.port),
        )
        (outcome,) = await self.deliver(0, candidates=candidates)
        self.assertEqual((outcome.kind, outcome.host), ("delivered", "mx2.test"))
        self.assertEqual(len(good.messages), 1)

    # -- TLS

    async def test_opportunisticStartTLS(self) -> None:
        sink = await startScriptedSink(self, tls=SinkTLS("other.name"))
        (outcome,) = await self.deliver(sink.port, tls=TLSPolicy("opportunistic"))
        self.assertEqual(outcome.kind, "delivered")
        self.assertTrue(sink.messages[0].tls)
        self.assertEqual(sink.transactionCommands[:3], ["EHLO", "STARTTLS", "EHLO"])

    async def test_opportunisticHandshakeFailureRetriesInClear(self) -> None:
        # Nothing speaks TLS after the 220: the handshake fails, and the host is tried again
        # without STARTTLS.
        sink = await startScriptedSink(
            self,
            extensions=(*DEFAULT_EXTENSIONS, "STARTTLS"),
            replies={"STARTTLS": [BROKEN_TLS]},
        )
        (outcome,) = await self.deliver(sink.port, tls=TLSPolicy("opportunistic"))
        self.assertEqual(outcome.kind, "delivered")
        self.assertEqual(len(sink.connections), 2)
        self.assertFalse(sink.messages[0].tls)
        self.assertNotIn("STARTTLS", sink.connections[1].commands)

    async def test_verifyWithTrustedCA(self) -> None:
        tls = SinkTLS("mx.test")
        sink = await startScriptedSink(self, tls=tls)
        policy = TLSPolicy("verify", caFile=tls.caPath(self))
        (outcome,) = await self.deliver(sink.port, tls=policy)
        self.assertEqual(outcome.kind, "delivered")
        self.assertTrue(sink.messages[0].tls)

    async def test_verifyWrongName(self) -> None:
        tls = SinkTLS("elsewhere.test")
        sink = await startScriptedSink(self, tls=tls)
        policy = TLSPolicy("verify", caFile=tls.caPath(self))
        (outcome,) = await self.deliver(sink.port, tls=policy)
        self.assertEqual(outcome.kind, "deferred")
        self.assertEqual(
            outcome.reply, "mx.test: TLS required, but certificate verification failed"
        )
        self.assertEqual(outcome.dsnCode, "4.7.5")
        self.assertEqual(len(sink.connections), 1)  # no clear-text connection after it
        self.assertEqual(sink.messages, [])
        self.assertNotIn("MAIL", sink.transactionCommands)

    async def test_verifyUntrustedCA(self) -> None:
        sink = await startScriptedSink(self, tls=SinkTLS("mx.test"))
        policy = TLSPolicy("verify", caFile=SinkTLS().caPath(self))  # another CA
        (outcome,) = await self.deliver(sink.port, tls=policy)
        self.assertEqual(outcome.kind, "deferred")
        self.assertIn("TLS required", outcome.reply)
        self.assertEqual(len(sink.connections), 1)

    async def test_verifyStartTLSNotOffered(self) -> None:
        sink = await startScriptedSink(self)
        policy = TLSPolicy("verify", caFile=SinkTLS().caPath(self))
        (outcome,) = await self.deliver(sink.port, tls=policy)
        self.assertEqual(outcome.kind, "deferred")
        self.assertEqual(outcome.reply, "mx.test: TLS required, but STARTTLS was not offered")
        self.assertEqual(outcome.dsnCode, "4.7.10")
        self.assertEqual(sink.messages, [])

    async def test_verifyUnreadableCAFile(self) -> None:
        sink = await startScriptedSink(self, tls=SinkTLS())
        path = self.mktemp()
        (outcome,) = await self.deliver(sink.port, tls=TLSPolicy("verify", caFile=path))
        self.assertEqual(outcome.kind, "deferred")
        self.assertNotIn(path, outcome.reply)  # never a local path in the status trail

    async def test_implicitTLS(self) -> None:
        tls = SinkTLS("mx.test")
        sink = await startScriptedSink(self, tls=tls, implicitTLS=True)
        policy = TLSPolicy("implicit", caFile=tls.caPath(self))
        (outcome,) = await self.deliver(sink.port, tls=policy)
        self.assertEqual(outcome.kind, "delivered")
        self.assertTrue(sink.messages[0].tls)
        self.assertNotIn("STARTTLS", sink.transactionCommands)

    async def test_implicitTLSWrongName(self) -> None:
        tls = SinkTLS("elsewhere.test")
        sink = await startScriptedSink(self, tls=tls, implicitTLS=True)
        policy = TLSPolicy("implicit", caFile=tls.caPath(self))
        (outcome,) = await self.deliver(sink.port, tls=policy)
        self.assertEqual(outcome.kind, "deferred")
        self.assertIn("TLS required", outcome.reply)
        self.assertEqual(sink.messages, [])

    # -- AUTH

    async def test_authPlain(self) -> None:
        tls = SinkTLS("mx.test")
        sink = await startScriptedSink(self, tls=tls, password="s3cret")
        policy = TLSPolicy("verify", caFile=tls.caPath(self))
        credentials = Credentials("relay", "s3cret")
        (outcome,) = await self.deliver(sink.port, tls=policy, credentials=credentials)
        self.assertEqual(outcome.kind, "delivered")
        self.assertEqual(sink.messages[0].authenticated, "relay")
        authLines = [line for _, line in sink.commands if line.startswith("AUTH")]
        self.assertEqual([line.split()[:2] for line in authLines], [["AUTH", "PLAIN"]])

    async def test_authLoginInClearWhenPolicyIsNone(self) -> None:
        sink = await startScriptedSink(self, password="s3cret", authMechanisms="LOGIN")
        credentials = Credentials("relay", "s3cret")
        (outcome,) = await self.deliver(sink.port, credentials=credentials)
        self.assertEqual(outcome.kind, "delivered")
        self.assertEqual(sink.messages[0].authenticated, "relay")

    async def test_authRefusedDefersEveryone(self) -> None:
        sink = await startScriptedSink(self, password="s3cret")
        credentials = Credentials("relay", "wrong")
        outcomes = await self.deliver(
            sink.port, ("a@dest.test", "b@dest.test"), credentials=credentials
        )
        self.assertEqual(
            [(o.kind, o.remoteCode, o.dsnCode) for o in outcomes], [("deferred", 535, "4.7.8")] * 2
        )
        self.assertEqual(outcomes[0].reply, "mx.test: 535 5.7.8 authentication credentials invalid")
        self.assertEqual(sink.messages, [])

    # -- candidates

    async def test_firstCandidateRefusedSecondUsed(self) -> None:
        sink = await startScriptedSink(self)
        candidates = (
            Candidate("mx1.test", "127.0.0.1", closedPort()),
            Candidate("mx2.test", "127.0.0.1", sink.port),
        )
        (outcome,) = await self.deliver(0, candidates=candidates)
        self.assertEqual((outcome.kind, outcome.host), ("delivered", "mx2.test"))

    async def test_greeting421NextCandidate(self) -> None:
        busy = await startScriptedSink(self, greeting="421 4.3.2 too busy")
        good = await startScriptedSink(self)
        candidates = (
            Candidate("mx1.test", "127.0.0.1", busy.port),
            Candidate("mx2.test", "127.0.0.1", good.port),
        )
        (outcome,) = await self.deliver(0, candidates=candidates)
        self.assertEqual(outcome.host, "mx2.test")

    async def test_allCandidatesDown(self) -> None:
        candidates = (
            Candidate("mx1.test", "127.0.0.1", closedPort()),
            Candidate("mx2.test", "127.0.0.1", closedPort()),
        )
        a, b = await self.deliver(0, ("a@dest.test", "b@dest.test"), candidates=candidates)
        self.assertEqual(
            a,
            RecipientOutcome(
                "a@dest.test", "deferred", "mx2.test: connection refused", "", "4.4.1", 0
            ),
        )
        self.assertEqual(b.kind, "deferred")

    async def test_noCandidates(self) -> None:
        pool = self.pool()
        envelope = Envelope(SENDER, ("a@dest.test",), MESSAGE)
        (outcome,) = await pool.deliver("dest.test", (), NO_TLS, envelope)
        self.assertEqual((outcome.kind, outcome.reply), ("deferred", "no host could be reached"))

    async def test_everyHostRefusesAtGreeting(self) -> None:
        first = await startScriptedSink(self, greeting="554 5.7.1 go away")
        second = await startScriptedSink(self, greeting="554 5.7.1 go away too")
        candidates = (
            Candidate("mx1.test", "127.0.0.1", first.port),
            Candidate("mx2.test", "127.0.0.1", second.port),
        )
        (outcome,) = await self.deliver(0, candidates=candidates)
        self.assertEqual(
            (outcome.kind, outcome.reply), ("failed", "mx2.test: 554 5.7.1 go away too")
        )

    async def test_connectionLostBeforeEndOfDataReply(self) -> None:
        closing = await startScriptedSink(self, replies={"END": "<close>"})
        good = await startScriptedSink(self)
        candidates = (
            Candidate("mx1.test", "127.0.0.1", closing.port),
            Candidate("mx2.test", "127.0.0.1", good.port),
        )
        (outcome,) = await self.deliver(0, candidates=candidates)
        self.assertEqual(outcome.host, "mx2.test")

    async def test_connectByName(self) -> None:
        sink = await startScriptedSink(self)
        candidate = Candidate("localhost", None, sink.port)
        (outcome,) = await self.deliver(0, candidates=(candidate,))
        self.assertEqual((outcome.kind, outcome.host), ("delivered", "localhost"))

    async def test_stalledServer(self) -> None:
        sink = await startScriptedSink(self, replies={"MAIL": STALL})
        pool = self.pool(timeouts=Timeouts(connect=5, command=0.2, data=5))
        (outcome,) = await self.deliver(sink.port, pool=pool)
        self.assertEqual((outcome.kind, outcome.dsnCode), ("deferred", "4.4.2"))
        self.assertIn("timed out", outcome.reply)

    async def test_endlessReply(self) -> None:
        sink = await startScriptedSink(self, replies={"EHLO": ENDLESS})
        (outcome,) = await self.deliver(sink.port)
        self.assertEqual(outcome.kind, "deferred")
        self.assertIn("protocol error", outcome.reply)
