"""
The holes of issue 23, each closed with a test that fails on the code before it (see
SECURITY.md): TLS handshakes and polite closes that never finish, DATA dribbled past any
deadline, guesses at one account from many addresses, message text pipelined before the 354,
the store's failures flooding the log, the status API's recipient filter and dribbled HTTP
headers, and a Redis enqueue that runs after its client was told 451.

Protocol tests run on a StringTransport with a task.Clock (mailrelay's own fixture); the Redis
fence is tested on a private redis-server that is paused with SIGSTOP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import UTC, datetime
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from mailrelay import metrics
from mailrelay.auth.throttle import LoginThrottle
from mailrelay.config import ConfigError, parseConfig
from mailrelay.interfaces import StoreError
from mailrelay.model import HeaderOptions, Notification, Recipient
from mailrelay.smtp import replies
from mailrelay.smtp.protocol import CLOSE_GRACE, SubmissionProtocol
from mailrelay.smtp.storehealth import StoreHealth
from mailrelay.web.channel import HEAD_DEADLINE, HeadDeadlineChannel
from mailrelay.web.notifications import BadQuery, recipientFilter
from tests.smtp_fixture import (
    ACCOUNT,
    PASSWORD,
    SENDER_DOMAIN,
    ProtocolHarness,
    Session,
    TLSStringTransport,
    plain,
)
from tests.store_mixin import BODY
from tests.test_smtp_protocol import assertReply

FROM = f"<app@{SENDER_DOMAIN}>"
MESSAGE = f"From: app@{SENDER_DOMAIN}\r\nSubject: x\r\n\r\nbody\r\n.\r\n"


class AbortRecordingTransport(TLSStringTransport):
    """Records abortConnection (the hard close) apart from loseConnection (the polite one)."""

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class HardeningTestCase(TestCase):
    limits: dict[str, Any] = {}

    @inlineCallbacks
    def setUp(self) -> Any:
        self.harness = ProtocolHarness(self, self.limits)
        yield self.harness.start()

    def connect(
        self, clientAddress: str = "192.0.2.7", implicitTLS: bool = False, **overrides: Any
    ) -> Session:
        protocol = SubmissionProtocol(self.harness.settings(**overrides), implicitTLS=implicitTLS)
        transport = AbortRecordingTransport(peerAddress=IPv4Address("TCP", clientAddress, 40000))
        protocol.makeConnection(transport)
        return Session(protocol, transport)

    @inlineCallbacks
    def toData(self, session: Session) -> Any:
        yield session.login()
        assertReply(self, (yield session.command(f"MAIL FROM:{FROM}")), replies.SENDER_OK)
        assertReply(self, (yield session.command("RCPT TO:<a@example.org>")), replies.RECIPIENT_OK)

    @inlineCallbacks
    def queued(self) -> Any:
        stats = yield self.harness.store.stats()
        return stats.queued


class TLSHandshakeDeadlineTests(HardeningTestCase):
    """A TLS handshake that never completes is aborted at tls_handshake_timeout (30 s)."""

    def test_implicitTLSHandshakeAborted(self) -> None:
        session = self.connect(implicitTLS=True, security="tls", tlsContext=object())
        self.harness.clock.advance(29)
        self.assertFalse(session.transport.aborted)
        self.harness.clock.advance(1)
        self.assertTrue(session.transport.aborted)

    def test_completedHandshakeKeepsTheConnection(self) -> None:
        session = self.connect(implicitTLS=True, security="tls", tlsContext=object())
        self.harness.clock.advance(10)
        session.protocol.handshakeCompleted()
        self.harness.clock.advance(200)
        self.assertFalse(session.transport.aborted)
        self.assertFalse(session.transport.disconnecting)

    @inlineCallbacks
    def test_handshakeAfterStartTLSAborted(self) -> Any:
        session = self.connect(security="starttls", tlsContext=object())
        yield session.command("EHLO client.test")
        reply = yield session.command("STARTTLS")
        assertReply(self, reply, replies.READY_TLS)
        self.assertEqual(session.transport.events[-1], "startTLS")
        self.harness.clock.advance(30)
        self.assertTrue(session.transport.aborted)

    def test_handshakeTimeoutConfigurable(self) -> None:
        config = parseConfig({"hostname": "h", "limits": {"tls_handshake_timeout": 5}})
        self.assertEqual(config.limits.tls_handshake_timeout, 5)
        self.assertRaises(
            ConfigError, parseConfig, {"hostname": "h", "limits": {"tls_handshake_timeout": 0}}
        )


class PoliteCloseDeadlineTests(HardeningTestCase):
    """A 421 or 221 whose connection does not go (the client does not read) is aborted."""

    @inlineCallbacks
    def test_closeAbortedAfterGrace(self) -> Any:
        session = self.connect()
        yield session.command("QUIT")
        self.assertTrue(session.transport.disconnecting)
        self.harness.clock.advance(CLOSE_GRACE - 1)
        self.assertFalse(session.transport.aborted)
        self.harness.clock.advance(1)
        self.assertTrue(session.transport.aborted)


class DataDeadlineTests(HardeningTestCase):
    limits = {"data_rate_grace": 10, "data_min_rate": 100, "data_total_timeout": 60}

    @inlineCallbacks
    def test_dribbledDataCut(self) -> Any:
        """A byte every 5 s (well inside data_timeout's 600 s idle limit) is cut once the
        grace is over and the rate is below the minimum; nothing is stored."""
        session = self.connect()
        yield self.toData(session)
        self.assertTrue((yield session.command("DATA")).startswith("354 "))
        for _ in range(3):
            session.protocol.dataReceived(b"x")
            self.harness.clock.advance(5)
        lines = session.take()
        self.assertTrue(lines and lines[-1].startswith("421 4.4.2 "), lines)
        self.assertTrue(session.transport.disconnecting)
        self.assertEqual((yield self.queued()), 0)

    @inlineCallbacks
    def test_totalDeadline(self) -> Any:
        """Even at a fine rate, the DATA section ends at data_total_timeout."""
        session = self.connect()
        yield self.toData(session)
        yield session.command("DATA")
        for _ in range(59):
            session.protocol.dataReceived(b"x" * 200 + b"\r\n")
            self.harness.clock.advance(1)
        self.assertFalse(session.transport.disconnecting)
        self.harness.clock.advance(1)
        self.assertTrue(session.take()[-1].startswith("421 4.4.2 "))
        self.assertEqual((yield self.queued()), 0)

    @inlineCallbacks
    def test_steadyDataAccepted(self) -> Any:
        session = self.connect()
        yield self.toData(session)
        yield session.command("DATA")
        session.protocol.dataReceived(f"From: app@{SENDER_DOMAIN}\r\n\r\n".encode())
        for _ in range(15):
            session.protocol.dataReceived(b"y" * 150 + b"\r\n")
            self.harness.clock.advance(1)
        lines = yield session.send(".\r\n")
        self.assertTrue(lines[-1].startswith("250 2.0.0 OK id="), lines)
        # The pace check went with the DATA section: no timer is left to fire.
        self.harness.clock.advance(100)
        self.assertFalse(session.transport.disconnecting)

    def test_defaults(self) -> None:
        limits = parseConfig({"hostname": "h"}).limits
        self.assertEqual(
            (limits.data_total_timeout, limits.data_min_rate, limits.data_rate_grace),
            (1800, 1024, 600),
        )


class PipeliningBeforeDataTests(HardeningTestCase):
    @inlineCallbacks
    def test_textBefore354RefusedAndDiscarded(self) -> Any:
        """Message text (with a command smuggled in it) sent with DATA, before the 354:
        554 5.5.0, the connection closed, nothing stored or executed."""
        session = self.connect()
        yield self.toData(session)
        lines = yield session.send(
            "DATA\r\n" + f"From: app@{SENDER_DOMAIN}\r\n\r\nhi\r\n.\r\nRSET\r\nNOOP\r\n"
        )
        self.assertEqual(len(lines), 1, lines)
        assertReply(self, lines[0], replies.IMPROPER_PIPELINING)
        self.assertTrue(session.transport.disconnecting)
        self.assertEqual((yield self.queued()), 0)

    @inlineCallbacks
    def test_dataAloneStillPipelines(self) -> Any:
        """DATA as the last command of a pipelined group is RFC 2920's, and still works."""
        session = self.connect()
        yield session.login()
        lines = yield session.send(
            f"MAIL FROM:{FROM}\r\nRCPT TO:<a@example.org>\r\nDATA\r\n", replies=3
        )
        self.assertTrue(lines[-1].startswith("354 "))
        lines = yield session.send(MESSAGE)
        self.assertTrue(lines[-1].startswith("250 2.0.0 OK id="), lines)


class AccountThrottleTests(SynchronousTestCase):
    """Guesses at one account from many addresses (mailrelay.auth.throttle)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.throttle = LoginThrottle(
            self.clock.seconds, maxFailures=10, maxAccountFailures=20, window=300
        )

    def test_manyAddressesThrottled(self) -> None:
        """72 guesses from 8 addresses (9 each: none over the per-address limit)."""
        refused = 0
        for guess in range(72):
            address = f"198.51.100.{guess % 8}"
            if self.throttle.accountBlocked("acme", address):
                refused += 1
                continue
            self.assertFalse(self.throttle.blocked(address))
            self.throttle.failed(address, "acme")
        self.assertEqual(refused, 52)
        self.assertTrue(self.throttle.accountBlocked("ACME", "203.0.113.1"))
        self.assertFalse(self.throttle.accountBlocked("globex", "198.51.100.1"))

    def test_ownerNotLockedOut(self) -> None:
        self.throttle.succeeded("acme", "192.0.2.7")
        for i in range(30):
            self.throttle.failed(f"198.51.100.{i}", "acme")
        self.assertTrue(self.throttle.accountBlocked("acme", "198.51.100.99"))
        self.assertFalse(self.throttle.accountBlocked("acme", "192.0.2.7"))

    def test_windowPasses(self) -> None:
        for i in range(20):
            self.throttle.failed(f"198.51.100.{i}", "acme")
        self.assertTrue(self.throttle.accountBlocked("acme", "203.0.113.1"))
        self.clock.advance(301)
        self.assertFalse(self.throttle.accountBlocked("acme", "203.0.113.1"))


class AccountThrottleProtocolTests(HardeningTestCase):
    @inlineCallbacks
    def test_454ForOthersOwnerGetsIn(self) -> Any:
        self.harness.throttle = LoginThrottle(self.harness.clock.seconds, maxAccountFailures=4)
        owner = self.connect("192.0.2.7")
        yield owner.login()  # the owner's address logged in before the attack
        for i in range(4):
            guesser = self.connect(f"198.51.100.{i}")
            yield guesser.command("EHLO x")
            reply = yield guesser.command(f"AUTH PLAIN {plain(ACCOUNT, 'guess')}")
            assertReply(self, reply, replies.AUTH_FAILED)
        guesser = self.connect("198.51.100.200")
        yield guesser.command("EHLO x")
        reply = yield guesser.command(f"AUTH PLAIN {plain(ACCOUNT, PASSWORD)}")
        assertReply(self, reply, replies.ACCOUNT_THROTTLED)
        self.assertTrue(reply.startswith("454 4.7.0 "))
        owner = self.connect("192.0.2.7")
        yield owner.command("EHLO x")
        reply = yield owner.command(f"AUTH PLAIN {plain(ACCOUNT, PASSWORD)}")
        assertReply(self, reply, replies.AUTH_OK)


class StoreFailureLogTests(HardeningTestCase):
    @inlineCallbacks
    def test_outageLoggedOnceAndCounted(self) -> Any:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        before = metrics.storeFailures._value.get()
        sessions = []
        for _ in range(3):
            session = self.connect()
            yield self.toData(session)
            yield session.command("DATA")
            sessions.append(session)
        yield self.harness.store.close()
        for session in sessions:
            lines = yield session.send(MESSAGE)
            assertReply(self, lines[-1], replies.TEMPORARY_FAILURE)
        self.assertEqual(self.flushLoggedErrors(), [])  # no traceback per message
        downs = [e for e in events if "store unavailable" in e.get("log_format", "")]
        self.assertEqual(len(downs), 1)
        self.assertEqual(metrics.storeFailures._value.get() - before, 3)

    def test_downAndBackLoggedOnce(self) -> None:
        from twisted.python.failure import Failure

        events: list[dict[str, Any]] = []
        health = StoreHealth(Logger(observer=events.append))
        health.succeeded()
        for _ in range(5):
            health.failed(Failure(StoreError("down")))
        health.succeeded()
        health.succeeded()
        self.assertEqual([e["log_level"].name for e in events], ["error", "info"])


class RecipientFilterTests(SynchronousTestCase):
    def test_malformed400(self) -> None:
        for value in ("email:", "email:not-an-address", "sms:abc", "sms:+", "sms:0123"):
            self.assertRaises(BadQuery, recipientFilter, [value])

    def test_normalisedAsRcpt(self) -> None:
        self.assertEqual(
            recipientFilter(["email:用户@例子.广告"]), "email:用户@xn--fsqu00a.xn--4rr70v"
        )
        self.assertEqual(recipientFilter(["email:A@Example.ORG"]), "email:A@example.org")
        self.assertEqual(recipientFilter(["sms:004477331234567"]), "sms:+4477331234567")


class HeadDeadlineTests(SynchronousTestCase):
    """A client dribbling its request head is timed out though every byte resets the idle
    timer."""

    def connect(self, site: Site, clock: Clock) -> Any:
        from twisted.internet.testing import StringTransport

        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def test_dribbledHeadersTimedOut(self) -> None:
        clock = Clock()
        site = Site(Resource(), reactor=clock, timeout=60)
        site.protocol = HeadDeadlineChannel  # type: ignore[assignment]
        channel, transport = self.connect(site, clock)
        head = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 10
        for byte in head[: int(HEAD_DEADLINE) - 1]:
            channel.dataReceived(bytes([byte]))
            clock.advance(1)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"X")
        clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_siteUsesTheChannel(self) -> None:
        from mailrelay.web import site as siteModule

        source = open(siteModule.__file__).read()
        self.assertIn("site.protocol = HeadDeadlineChannel", source)


async def pausableRedis(
    test: TestCase, timeout: float
) -> tuple[subprocess.Popen[bytes], Any, Notification]:
    """A private redis-server (let run again at cleanup, should a test leave it stopped), an
    open RedisStore on it with the store ``timeout``, and a notification to enqueue."""
    from mailrelay.store.redis import RedisStore
    from tests.relay_fixture import startRedisServer

    server, port = startRedisServer(test)
    test.addCleanup(lambda: os.kill(server.pid, signal.SIGCONT))
    store = RedisStore(f"redis://127.0.0.1:{port}/0", reactor, timeout=timeout)
    await store.open()
    test.addCleanup(store.close)
    notification = Notification(
        notification_id=store.nextNotificationId(),
        account="acme",
        sender="app@acme.example",
        recipients=(Recipient("a@example.org", "email"),),
        size=len(BODY),
        received_at=datetime.now(UTC),
        options=HeaderOptions(),
    )
    return server, store, notification


class RedisFenceTests(TestCase):
    """With Redis paused past the store's timeout, the client gets 451 and the enqueue script,
    when Redis resumes, writes nothing: the client's retry is the only copy."""

    async def test_pausedServerStoresNothingAfterTimeout(self) -> None:
        server, store, notification = await pausableRedis(self, timeout=1.0)
        os.kill(server.pid, signal.SIGSTOP)
        started = time.monotonic()
        enqueued = store.enqueue(notification, BODY)
        outcomes: list[object] = []
        enqueued.addBoth(lambda result: outcomes.append(result) or result)
        # Past the timeout (1 s) and the fence's deadline, the store keeps asking the silent
        # server whether the message was stored; it answers once it runs again, the queued
        # script refusing to write (too late): a 451 that means "not stored".
        await deferLater(reactor, 2.5, lambda: None)
        self.assertEqual(outcomes, [])
        os.kill(server.pid, signal.SIGCONT)
        with self.assertRaises(StoreError):
            await enqueued
        self.assertLess(time.monotonic() - started, 5.0)
        found = await store.getNotification(notification.notification_id)
        self.assertIsNone(found)
        stats = await store.stats()
        self.assertEqual(stats.queued, 0)
        # And the client's retry stores it once.
        await store.enqueue(notification, BODY)
        self.assertEqual((await store.stats()).queued, 1)


class RedisUnknownOutcomeTests(TestCase):
    """An enqueue whose script was sent but whose answer never came (the connection lost
    with it) is not answered 451 while it may still run: after the fence deadline the store
    asks the server, and a message that was stored after all is a success."""

    timeout = 30

    async def test_storedAfterTheConnectionWasLost(self) -> None:
        server, store, notification = await pausableRedis(self, timeout=2.0)
        os.kill(server.pid, signal.SIGSTOP)
        enqueued = store.enqueue(notification, BODY)
        await deferLater(reactor, 0.2, lambda: None)
        # The script is in the server's socket buffer; our side loses the connection.
        for connection in list(store._client._handler._factory.pool):  # type: ignore[union-attr]
            connection.transport.abortConnection()
        await deferLater(reactor, 0.2, lambda: None)
        os.kill(server.pid, signal.SIGCONT)  # the buffered script runs, before its deadline
        await enqueued  # not a StoreError: it was stored
        self.assertIsNotNone(await store.getNotification(notification.notification_id))
