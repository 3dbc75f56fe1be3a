"""
The connection pool over real sockets: reuse (at once, or checked with RSET after an idle
while), the connection limits and their waiting line, idle connections closing, transactions
of bounded size, stopping.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from mailrelay.delivery.route import Candidate, TLSPolicy
from mailrelay.delivery.smtp.client import Envelope, RecipientOutcome
from mailrelay.delivery.smtp.pool import SMTPClientPool
from tests.smtp_sinks import Delayed, ScriptedSink, startScriptedSink
from tests.test_delivery_smtp_client import FAST, MESSAGE, NO_TLS, SENDER


class PoolTests(TestCase):
    def pool(self, **kwargs: Any) -> SMTPClientPool:
        kwargs.setdefault("timeouts", FAST)
        pool = SMTPClientPool(reactor, "relay.test", **kwargs)
        self.addCleanup(pool.close)
        return pool

    def deliver(
        self,
        pool: SMTPClientPool,
        sink: ScriptedSink,
        recipients: tuple[str, ...] = ("a@dest.test",),
        destination: str = "dest.test",
        tls: TLSPolicy = NO_TLS,
    ) -> Deferred[list[RecipientOutcome]]:
        candidates = (Candidate("mx.test", "127.0.0.1", sink.port),)
        return pool.deliver(destination, candidates, tls, Envelope(SENDER, recipients, MESSAGE))

    async def test_reuseAtOnce(self) -> None:
        """A connection whose transaction just ended in order takes the next message
        without an RSET first."""
        sink = await startScriptedSink(self)
        pool = self.pool()
        outcomes = [await self.deliver(pool, sink) for _ in range(3)]
        self.assertEqual([o.kind for (o,) in outcomes], ["delivered"] * 3)
        self.assertEqual(len(sink.connections), 1)
        self.assertEqual(sink.transactionCommands, ["EHLO"] + ["MAIL", "RCPT", "DATA"] * 3)

    async def test_reuseAfterIdleChecksWithRset(self) -> None:
        """Idle longer than ``checkAfterIdle``: the reuse starts with an RSET."""
        sink = await startScriptedSink(self)
        pool = self.pool(checkAfterIdle=0.05)
        await self.deliver(pool, sink)
        await deferLater(reactor, 0.1)
        (second,) = await self.deliver(pool, sink)
        self.assertEqual(second.kind, "delivered")
        self.assertEqual(
            sink.transactionCommands,
            ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA"],
        )

    async def test_reuseAfterARefusedSenderChecksWithRset(self) -> None:
        """A transaction that did not end in order (the sender refused) leaves the
        connection to be checked before its next one."""
        sink = await startScriptedSink(self, replies={"MAIL": ["550 5.7.1 not you", "250 ok"]})
        pool = self.pool()
        (refused,) = await self.deliver(pool, sink)
        (delivered,) = await self.deliver(pool, sink)
        self.assertEqual([refused.kind, delivered.kind], ["failed", "delivered"])
        self.assertEqual(len(sink.connections), 1)
        # The refused transaction's own RSET, then the check before the next one.
        self.assertEqual(
            sink.transactionCommands,
            ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "RSET", "MAIL", "RCPT", "DATA"],
        )

    async def test_deadConnectionReusedAtOnceConnectsAnew(self) -> None:
        """The server went away after its last reply, unseen yet: the message reused at once
        fails on the old connection and goes down a new one to the same host."""
        sink = await startScriptedSink(self, replies={"MAIL": ["250 ok", "421 4.3.2 bye"]})
        pool = self.pool()
        await self.deliver(pool, sink)
        (second,) = await self.deliver(pool, sink)
        self.assertEqual(second.kind, "delivered")
        self.assertEqual(len(sink.connections), 2)
        self.assertEqual([m.connection for m in sink.messages], [0, 1])

    async def test_reuseWithRset(self) -> None:
        sink = await startScriptedSink(self)
        pool = self.pool(checkAfterIdle=0)
        (first,) = await self.deliver(pool, sink)
        self.assertEqual(pool.openConnections(), {"dest.test": 1})
        (second,) = await self.deliver(pool, sink)
        self.assertEqual([first.kind, second.kind], ["delivered", "delivered"])
        self.assertEqual(len(sink.connections), 1)
        self.assertEqual(
            sink.transactionCommands,
            ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA"],
        )
        self.assertEqual([m.connection for m in sink.messages], [0, 0])

    async def test_rsetRefusedConnectsAnew(self) -> None:
        sink = await startScriptedSink(self, replies={"RSET": "500 5.5.1 no"})
        pool = self.pool(checkAfterIdle=0)
        await self.deliver(pool, sink)
        (second,) = await self.deliver(pool, sink)
        self.assertEqual(second.kind, "delivered")
        self.assertEqual(len(sink.connections), 2)
        self.assertEqual([m.connection for m in sink.messages], [0, 1])
        self.assertEqual(pool.openConnections(), {"dest.test": 1})

    async def test_otherTLSPolicyIsNotReused(self) -> None:
        sink = await startScriptedSink(self)
        pool = self.pool()
        await self.deliver(pool, sink)
        await self.deliver(pool, sink, tls=TLSPolicy("opportunistic"))
        self.assertEqual(len(sink.connections), 2)

    async def test_perDestinationLimitWaits(self) -> None:
        sink = await startScriptedSink(self)
        pool = self.pool(maxPerDestination=1)
        finished: list[str] = []
        first = self.deliver(pool, sink, ("a@dest.test",))
        second = self.deliver(pool, sink, ("b@dest.test",))
        first.addCallback(lambda _: finished.append("first"))
        second.addCallback(lambda _: finished.append("second"))
        self.assertEqual(pool.openConnections(), {"dest.test": 1})
        await first
        await second
        self.assertEqual(finished, ["first", "second"])
        self.assertEqual(len(sink.connections), 1)  # the second reused the first's
        self.assertEqual(
            [m.recipients for m in sink.messages], [("a@dest.test",), ("b@dest.test",)]
        )

    async def test_otherDestinationsAreNotHeldUp(self) -> None:
        sink = await startScriptedSink(self)
        pool = self.pool(maxPerDestination=1)
        deliveries = [
            self.deliver(pool, sink, destination="one.test"),
            self.deliver(pool, sink, destination="one.test"),
            self.deliver(pool, sink, destination="two.test"),
        ]
        self.assertEqual(pool.openConnections(), {"one.test": 1, "two.test": 1})
        for delivery in deliveries:
            (outcome,) = await delivery
            self.assertEqual(outcome.kind, "delivered")

    async def test_totalLimitClosesAnIdleConnectionForAnotherDestination(self) -> None:
        sink = await startScriptedSink(self)
        pool = self.pool(maxConnections=1)
        await self.deliver(pool, sink, destination="one.test")
        self.assertEqual(pool.openConnections(), {"one.test": 1})
        (outcome,) = await self.deliver(pool, sink, destination="two.test")
        self.assertEqual(outcome.kind, "delivered")
        self.assertEqual(pool.openConnections(), {"two.test": 1})
        self.assertEqual(len(sink.connections), 2)
        await deferLater(reactor, 0.05)
        self.assertEqual(sink.connections[0].commands[-1], "QUIT")

    async def test_totalLimitWaits(self) -> None:
        sink = await startScriptedSink(self)
        pool = self.pool(maxConnections=1)
        one = self.deliver(pool, sink, destination="one.test")
        two = self.deliver(pool, sink, destination="two.test")
        self.assertEqual(pool.openConnections(), {"one.test": 1})
        self.assertEqual([o.kind for (o,) in [await one, await two]], ["delivered"] * 2)

    async def test_oldestWaiterFirstAcrossDestinations(self) -> None:
        """The slot a delivery gives back goes to the oldest waiter that can take it, even
        one for another destination (the idle connection then closes for it), not to a
        younger waiter that could reuse that connection."""
        sink = await startScriptedSink(self)
        pool = self.pool(maxConnections=1)
        finished: list[str] = []
        deliveries = [
            self.deliver(pool, sink, (f"{name}@{destination}",), destination=destination)
            for name, destination in (("a", "one.test"), ("b", "two.test"), ("c", "one.test"))
        ]
        for delivery, name in zip(deliveries, "abc", strict=True):
            delivery.addCallback(lambda _, n=name: finished.append(n))
        for delivery in deliveries:
            await delivery
        self.assertEqual(finished, ["a", "b", "c"])
        self.assertEqual(len(sink.connections), 3)  # c could not reuse a's: b took its slot

    async def test_idleConnectionClosesAfterIdleTimeout(self) -> None:
        sink = await startScriptedSink(self)
        pool = self.pool(idleTimeout=0.1)
        await self.deliver(pool, sink)
        self.assertEqual(pool.openConnections(), {"dest.test": 1})
        await deferLater(reactor, 0.3)
        self.assertEqual(pool.openConnections(), {})
        self.assertEqual(sink.connections[0].commands[-1], "QUIT")
        self.assertEqual(sink._open, [])

    async def test_eachIdleConnectionHasItsOwnIdleTime(self) -> None:
        """Two connections gone idle at different times close each at the end of its own
        idle time (one timer serves them, timed for the oldest)."""
        sink = await startScriptedSink(self)
        pool = self.pool(idleTimeout=1.0)
        await DeferredList([self.deliver(pool, sink), self.deliver(pool, sink)])
        self.assertEqual(pool.openConnections(), {"dest.test": 2})
        await deferLater(reactor, 0.5)
        await self.deliver(pool, sink)  # takes the one idle since last: idle again from now
        await deferLater(reactor, 0.75)  # the other's idle time is over, not this one's
        self.assertEqual(pool.openConnections(), {"dest.test": 1})
        await deferLater(reactor, 1.0)
        self.assertEqual(pool.openConnections(), {})
        self.assertEqual([c.commands[-1] for c in sink.connections], ["QUIT", "QUIT"])

    async def test_serverClosesIdleConnection(self) -> None:
        sink = await startScriptedSink(self)
        pool = self.pool()
        await self.deliver(pool, sink)
        transport: Any = sink.connections[0].transport
        transport.write(b"421 4.4.2 idle too long\r\n")
        transport.loseConnection()
        await deferLater(reactor, 0.1)
        self.assertEqual(pool.openConnections(), {})
        (outcome,) = await self.deliver(pool, sink)
        self.assertEqual(outcome.kind, "delivered")
        self.assertEqual(len(sink.connections), 2)

    async def test_transactionsOfBoundedSize(self) -> None:
        sink = await startScriptedSink(self, replies={"RCPT:r3@dest.test": "550 5.1.1 unknown"})
        pool = self.pool(maxRecipientsPerTransaction=2)
        recipients = tuple(f"r{n}@dest.test" for n in range(5))
        outcomes = await self.deliver(pool, sink, recipients)
        self.assertEqual([o.kind for o in outcomes], ["delivered"] * 3 + ["failed"] + ["delivered"])
        self.assertEqual(
            [m.recipients for m in sink.messages],
            [
                ("r0@dest.test", "r1@dest.test"),
                ("r2@dest.test",),
                ("r4@dest.test",),
            ],
        )
        self.assertEqual(len(sink.connections), 1)

    async def test_hostFailureMidwayMovesOnWithTheRest(self) -> None:
        """A host lost after the first transaction: the remaining recipients go to the next."""
        first = await startScriptedSink(self, replies={"MAIL": ["250 ok", "421 4.3.2 bye"]})
        second = await startScriptedSink(self)
        pool = self.pool(maxRecipientsPerTransaction=1)
        candidates = (
            Candidate("mx1.test", "127.0.0.1", first.port),
            Candidate("mx2.test", "127.0.0.1", second.port),
        )
        envelope = Envelope(SENDER, ("a@dest.test", "b@dest.test"), MESSAGE)
        a, b = await pool.deliver("dest.test", candidates, NO_TLS, envelope)
        self.assertEqual((a.kind, a.host), ("delivered", "mx1.test"))
        self.assertEqual((b.kind, b.host), ("delivered", "mx2.test"))

    async def test_close(self) -> None:
        sink = await startScriptedSink(self, replies={"END": ["250 ok", Delayed(0.1, "250 ok")]})
        pool = self.pool(maxPerDestination=1)
        await self.deliver(pool, sink, ("idle@dest.test",), destination="other.test")
        busy = self.deliver(pool, sink, ("b@dest.test",))
        waiting = self.deliver(pool, sink, ("c@dest.test",))
        while "DATA" not in sink.transactionCommands[4:]:
            await deferLater(reactor, 0.01)
        await pool.close()
        self.assertEqual(pool.openConnections(), {})
        ((busyOutcome,), (waitingOutcome,)) = [await busy, await waiting]
        self.assertEqual(busyOutcome.kind, "delivered")  # it was in its transaction
        self.assertEqual(
            (waitingOutcome.kind, waitingOutcome.reply), ("deferred", "delivery stopped")
        )
        (late,) = await self.deliver(pool, sink)
        self.assertEqual(late.kind, "deferred")
        self.assertEqual([c.commands[-1] for c in sink.connections], ["QUIT", "QUIT"])
        self.assertEqual(sink._open, [])

    async def test_closeStopsBeforeTheNextTransaction(self) -> None:
        sink = await startScriptedSink(self)
        pool = self.pool(checkAfterIdle=0)
        await self.deliver(pool, sink)
        reusing = self.deliver(pool, sink)  # sends RSET, then would send MAIL
        closed = pool.close()
        (outcome,) = await reusing
        await closed
        self.assertEqual((outcome.kind, outcome.dsnCode), ("deferred", "4.3.2"))
        self.assertEqual(len(sink.messages), 1)

    async def test_cancelledWhileWaitingGivesUpItsPlace(self) -> None:
        sink = await startScriptedSink(self)
        pool = self.pool(maxPerDestination=1)
        first = self.deliver(pool, sink, ("a@dest.test",))
        cancelled = self.deliver(pool, sink, ("b@dest.test",))
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        (outcome,) = await first
        self.assertEqual(outcome.kind, "delivered")
        (again,) = await self.deliver(pool, sink, ("c@dest.test",))
        self.assertEqual(again.kind, "delivered")
        self.assertEqual(
            [m.recipients for m in sink.messages], [("a@dest.test",), ("c@dest.test",)]
        )
