"""
Intake flow control (:mod:`mailrelay.delivery.inflow`): the tokens on a Clock, the delivery
loop giving them back as it claims, and a MAIL waiting for one over the SMTP protocol.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailrelay.delivery.inflow import InFlow
from mailrelay.delivery.service import DeliveryService, LoopSettings
from mailrelay.model import Notification, Recipient
from mailrelay.testing import MemoryStore
from tests.test_delivery_loop import HeldEngine


class InFlowTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.flow = InFlow(self.clock, delay=1.0, capacity=2)

    def waitingTaker(self) -> list[object]:
        """Take when no token is left: what the wait fires with, once it does."""
        waiting = self.flow.take()
        assert waiting is not None, "a token was left"
        fired: list[object] = []
        waiting.addCallback(fired.append)
        return fired

    def test_tokensThenWait(self) -> None:
        """Two MAILs go on at once; the third waits until a token comes back."""
        self.assertIsNone(self.flow.take())
        self.assertIsNone(self.flow.take())
        fired = self.waitingTaker()
        self.clock.advance(0.5)
        self.assertEqual(fired, [])
        self.flow.give(1)
        self.assertEqual(fired, [None])
        self.assertEqual((self.flow.tokens, self.flow.waiting), (0, 0))

    def test_waitNeverLongerThanTheDelay(self) -> None:
        """Without a token a MAIL goes on after the delay: the intake slows, never stops."""
        self.flow.take(), self.flow.take()
        fired = self.waitingTaker()
        self.clock.advance(0.999)
        self.assertEqual(fired, [])
        self.clock.advance(0.001)
        self.assertEqual(fired, [None])
        self.assertEqual(self.flow.waiting, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waitersInOrder(self) -> None:
        self.flow.take(), self.flow.take()
        waiters = [self.waitingTaker() for _ in range(3)]
        self.flow.give(2)
        self.assertEqual([len(fired) for fired in waiters], [1, 1, 0])
        self.flow.refill()
        self.assertEqual([len(fired) for fired in waiters], [1, 1, 1])
        self.assertEqual(self.flow.tokens, 1)  # capacity 2, one taken by the last waiter

    def test_tokensNeverBeyondCapacity(self) -> None:
        self.flow.give(50)
        self.assertEqual(self.flow.tokens, 2)

    def test_openLetsEveryoneGo(self) -> None:
        self.flow.take(), self.flow.take()
        waiters = [self.waitingTaker() for _ in range(3)]
        self.flow.open()
        self.assertEqual(waiters, [[None]] * 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_offWithoutDelay(self) -> None:
        flow = InFlow(self.clock, delay=0, capacity=1)
        self.assertEqual([flow.take() for _ in range(5)], [None] * 5)


class LoopGivesTokensTests(TestCase):
    """The loop gives a token back for each notification it claims, and fills them up once
    it has caught up; with its attempts all in flight it claims nothing and gives none."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.store = MemoryStore(self.clock)
        self.engine = HeldEngine()
        self.flow = InFlow(self.clock, delay=1.0, capacity=4)
        self.service = DeliveryService(
            self.store,
            self.engine,  # type: ignore[arg-type]
            self.clock,
            LoopSettings(concurrency=4, batch=2, pollInterval=0.5),
            inFlow=self.flow,
        )
        self.service.startService()
        self.addCleanup(self.stop)

    def stop(self) -> None:
        """Stop the loop with its attempts ended (as the engine's would, with outcomes)."""
        stopped = self.service.stopService() if self.service.running else None
        for attempt in self.engine.attempts:
            if not attempt.called:
                attempt.callback(None)
        self.clock.advance(0)
        if stopped is not None:
            self.successResultOf(stopped)

    def enqueue(self, count: int) -> None:
        for _ in range(count):
            nid = self.store.nextNotificationId()
            notification = Notification(
                notification_id=nid,
                account="acme",
                sender="app@acme.example",
                recipients=(Recipient(address="alice@example.com", channel="email"),),
                size=10,
                received_at=datetime.fromtimestamp(self.clock.seconds(), UTC),
            )
            self.successResultOf(self.store.enqueue(notification, b"Subject: x\r\n\r\nx\r\n"))

    def test_caughtUpFillsTheTokens(self) -> None:
        """Claims of full batches give a token each; the claim that finds fewer than it
        asked for (caught up) fills them all, those of MAILs that never stored included."""
        for _ in range(4):
            self.assertIsNone(self.flow.take())
        fired: list[Any] = []
        for _ in range(3):
            waiting = self.flow.take()
            assert waiting is not None
            waiting.addCallback(fired.append)
        self.enqueue(2)
        self.clock.advance(0)  # a batch of 2 (two waiters go on), then none: caught up
        self.assertEqual(len(self.engine.attempts), 2)
        self.assertEqual(len(fired), 3)
        self.assertEqual(self.flow.tokens, 3)

    def test_noTokensWhileEveryAttemptIsInFlight(self) -> None:
        self.enqueue(6)
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(len(self.engine.attempts), 4)  # the concurrency
        for _ in range(4):
            self.flow.take()
        waiting = self.flow.take()
        assert waiting is not None
        fired: list[Any] = []
        waiting.addCallback(fired.append)
        self.clock.advance(0.5)  # a poll: no room, nothing claimed, no token
        self.assertEqual(fired, [])
        self.engine.attempts[0].callback(None)  # room for one: the loop claims, gives
        self.clock.advance(LoopSettings().wakeDelay)
        self.assertEqual(len(self.engine.attempts), 5)
        self.assertEqual(fired, [None])
        self.assertEqual(self.flow.tokens, 0)

    def test_stopLetsWaitersGo(self) -> None:
        for _ in range(4):
            self.flow.take()
        waiting = self.flow.take()
        assert waiting is not None
        fired: list[Any] = []
        waiting.addCallback(fired.append)
        self.stop()
        self.assertEqual(fired, [None])


class MailWaitsForATokenTests(TestCase):
    """Over the SMTP protocol: with the delivery loop's tokens used up, a MAIL is answered
    once one comes back, or after the delay; the session goes on either way."""

    async def test_mailWaits(self) -> None:
        from tests.smtp_fixture import SENDER_DOMAIN, MemoryProtocolHarness

        harness = MemoryProtocolHarness(self)
        await harness.start()
        flow = InFlow(harness.clock, delay=1.0, capacity=1)
        harness.submissions.admit = flow.take
        session = harness.connect()
        await session.login()
        mail = f"MAIL FROM:<app@{SENDER_DOMAIN}>\r\n"
        self.assertEqual((await session.send(mail))[-1][:3], "250")
        self.assertEqual((await session.send("RSET\r\n"))[-1][:3], "250")
        session.protocol.dataReceived(mail.encode())
        self.assertEqual(session.take(), [])  # no token: waiting
        flow.give(1)
        self.assertEqual(session.take()[-1][:3], "250")
        self.assertEqual((await session.send("RSET\r\n"))[-1][:3], "250")
        session.protocol.dataReceived(mail.encode())
        harness.clock.advance(0.9)
        self.assertEqual(session.take(), [])
        harness.clock.advance(0.1)  # the delay is over: answered without a token
        self.assertEqual(session.take()[-1][:3], "250")
