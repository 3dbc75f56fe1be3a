"""
Accepted mail leaves: the whole relay (``mailrelay.tap``'s service tree) delivering to real
remote sides on loopback -- a scripted Twisted ESMTP sink and aiosmtpd as smarthost or as the
MX a ``twisted.names`` server on loopback names -- with the status trail read back from the
store, DKIM signatures checked with dkimpy, and bounces read as the sender's server gets them.
"""

from __future__ import annotations

import email
import email.policy
from collections.abc import Sequence
from email.message import EmailMessage
from typing import Any

import dkim
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailrelay.message.dkim import dnsRecord, generateKey
from mailrelay.model import fromTimestamp
from tests.dns_server import startDNSServer
from tests.relay_fixture import (
    ACCOUNT,
    CLIENT_TIMEOUT,
    PASSWORD,
    SENDER,
    SENDER_DOMAIN,
    RunningRelay,
    startRelay,
)
from tests.smtp_sinks import startAiosmtpdSink, startScriptedSink
from tests.test_integration import RecordingSMTP, acceptedId

ALICE = "alice@customer.example"
BOB = "bob@customer.example"


def message(recipients: Sequence[str], subject: str = "outbound") -> EmailMessage:
    letter = EmailMessage()
    letter["From"] = SENDER
    letter["To"] = ", ".join(recipients)
    letter["Subject"] = subject
    letter["X-IB-callback-data"] = "never leaves"
    letter.set_content("Hello from the delivery test.\n")
    return letter


def submit(relay: RunningRelay, recipients: Sequence[str], subject: str = "outbound") -> str:
    """Blocking: submit over STARTTLS with the password; the notification id."""
    with RecordingSMTP(
        "127.0.0.1", relay.ports["starttls"], local_hostname="app.test", timeout=CLIENT_TIMEOUT
    ) as smtp:
        smtp.starttls(context=relay.files.clientContext())
        smtp.login(ACCOUNT, PASSWORD)
        smtp.send_message(message(recipients, subject), to_addrs=list(recipients))
        assert smtp.dataReply is not None
        return acceptedId(smtp.dataReply[1].decode())


def smarthostConfig(port: int, **extra: str) -> str:
    lines = [
        "[delivery]",
        'mode = "smarthost"',
        f'smarthost = "tcp:host=127.0.0.1:port={port}"',
        'smarthost_tls = "none"',
        'retry_min = "1s"',
        'retry_max = "2s"',
    ]
    lines += [f"{key} = {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


async def trailOf(relay: RunningRelay, notificationId: str) -> list[tuple[str, str]]:
    return [
        (event.recipient.address, event.status_code)
        for event in await relay.store.statusTrail(notificationId)
    ]


async def waitForTrail(
    relay: RunningRelay, notificationId: str, finalCodes: int, timeout: float = 20.0
) -> list[tuple[str, str]]:
    """The trail once it has ``finalCodes`` final events (CH_RECEIVED in smarthost mode,
    CH_SENT, CH_FAILED, CAAS_FAILED), or fail after ``timeout`` seconds."""
    final = {"CH_FAILED", "CAAS_FAILED"} | (
        {"CH_SENT"} if 'mode = "mx"' in relay.files.configPath.read_text() else {"CH_RECEIVED"}
    )
    deadline = reactor.seconds() + timeout
    while True:
        trail = await trailOf(relay, notificationId)
        if sum(code in final for _, code in trail) >= finalCodes:
            return trail
        if reactor.seconds() > deadline:
            raise AssertionError(f"trail of {notificationId} incomplete: {trail}")
        await deferLater(reactor, 0.05, lambda: None)


async def waitFor(condition: Any, timeout: float = 20.0) -> None:
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError("timed out waiting")
        await deferLater(reactor, 0.05, lambda: None)


class SmarthostTests(TestCase):
    timeout = 60

    async def relayTo(self, sink: Any, **extra: str) -> RunningRelay:
        return await startRelay(self, extra=smarthostConfig(sink.port, **extra))

    async def test_deliveredToSmarthost(self) -> None:
        sink = await startScriptedSink(self)
        relay = await self.relayTo(sink)
        nid = await deferToThread(submit, relay, [ALICE, BOB])
        trail = await waitForTrail(relay, nid, 2)
        self.assertEqual(
            trail,
            [
                (ALICE, "CAAS_RECEIVED"),
                (BOB, "CAAS_RECEIVED"),
                (ALICE, "CAAS_SENT"),
                (BOB, "CAAS_SENT"),
                (ALICE, "CH_RECEIVED"),
                (BOB, "CH_RECEIVED"),
            ],
        )
        (received,) = sink.messages
        self.assertEqual((received.sender, list(received.recipients)), (SENDER, [ALICE, BOB]))
        self.assertIn(b"Subject: outbound", received.message)
        self.assertNotIn(b"X-IB-", received.message)
        self.assertIn(b"Message-ID:", received.message)
        self.assertIn(b"Received:", received.message)
        stats = await relay.store.stats()
        self.assertEqual((stats.queued, stats.deferred, stats.in_flight), (0, 0, 0))

    async def test_deliveredToAiosmtpd(self) -> None:
        """aiosmtpd, another implementation, as the smarthost (in a thread)."""
        sink = await startAiosmtpdSink(self)
        relay = await self.relayTo(sink)
        nid = await deferToThread(submit, relay, [ALICE, BOB])
        await waitForTrail(relay, nid, 2)
        (received,) = sink.messages
        self.assertEqual((received.sender, list(received.recipients)), (SENDER, [ALICE, BOB]))
        self.assertIn(b"Hello from the delivery test.", received.message)

    async def test_deferredThenDelivered(self) -> None:
        """451 at the end of DATA, then 250 on the retry: CH_DEFERRED, then CH_RECEIVED."""
        sink = await startScriptedSink(self, replies={"END": ["451 4.3.0 Try again later"]})
        relay = await self.relayTo(sink)
        nid = await deferToThread(submit, relay, [ALICE])
        trail = await waitForTrail(relay, nid, 1)
        self.assertEqual(
            [code for _, code in trail],
            ["CAAS_RECEIVED", "CAAS_SENT", "CH_DEFERRED", "CH_RECEIVED"],
        )
        (deferred,) = [
            e for e in await relay.store.statusTrail(nid) if e.status_code == "CH_DEFERRED"
        ]
        self.assertIn("451 4.3.0 Try again later", deferred.status_text)
        self.assertIn("127.0.0.1", deferred.status_text)
        self.assertEqual(len(sink.messages), 1)

    async def test_oneRecipientRefused(self) -> None:
        """550 at RCPT for one of two: only that one fails, and the sender gets a DSN."""
        sink = await startScriptedSink(self, replies={f"RCPT:{BOB}": "550 5.1.1 No such user"})
        relay = await self.relayTo(sink)
        nid = await deferToThread(submit, relay, [ALICE, BOB])
        trail = await waitForTrail(relay, nid, 2)
        self.assertIn((ALICE, "CH_RECEIVED"), trail)
        self.assertIn((BOB, "CH_FAILED"), trail)
        self.assertNotIn((BOB, "CH_RECEIVED"), trail)
        (failed,) = [e for e in await relay.store.statusTrail(nid) if e.status_code == "CH_FAILED"]
        self.assertEqual(failed.status_text, "127.0.0.1: 550 5.1.1 No such user")
        await waitFor(lambda: len(sink.messages) == 2)
        bounce = sink.messages[1]
        self.assertEqual((bounce.sender, list(bounce.recipients)), ("", [SENDER]))
        report = email.message_from_bytes(bounce.message, policy=email.policy.default)
        self.assertEqual(report.get_content_type(), "multipart/report")
        self.assertIn(BOB, bounce.message.decode("utf-8", "replace"))
        self.assertNotIn(f"Final-Recipient: rfc822; {ALICE}", bounce.message.decode())

    async def test_bouncesOff(self) -> None:
        sink = await startScriptedSink(self, replies={f"RCPT:{BOB}": "550 5.1.1 No such user"})
        relay = await self.relayTo(sink)
        await relay.updateAccount(bounces=False)
        nid = await deferToThread(submit, relay, [BOB])
        await waitForTrail(relay, nid, 1)
        await deferLater(reactor, 1.0, lambda: None)
        self.assertEqual(sink.messages, [])

    async def test_dkimSignedOnce(self) -> None:
        """The message is signed with the sender domain's key; dkimpy verifies it against
        the TXT record `mailrelay dkim generate` prints."""
        sink = await startScriptedSink(self)
        relay = await self.relayTo(sink)
        key = generateKey(SENDER_DOMAIN, "mr1", "rsa", fromTimestamp(reactor.seconds()))
        await relay.store.putDkimKey(key)
        name, value = dnsRecord(key)
        nid = await deferToThread(submit, relay, [ALICE])
        await waitForTrail(relay, nid, 1)
        (received,) = sink.messages
        self.assertTrue(received.message.startswith(b"DKIM-Signature:"))

        def dnsfunc(asked: bytes, timeout: int = 5) -> bytes:
            return value.encode() if asked.decode().rstrip(".") == name else b""

        self.assertTrue(dkim.verify(received.message, dnsfunc=dnsfunc))


class MXTests(TestCase):
    timeout = 60

    async def relayWithDNS(self, records: dict[str, Any], sinkPort: int) -> RunningRelay:
        dns = await startDNSServer(self, records)
        extra = "\n".join(
            [
                "[delivery]",
                'mode = "mx"',
                f'nameservers = ["{dns.nameserver}"]',
                f"mx_port = {sinkPort}",
                'allow_networks = ["127.0.0.0/8"]',
                'retry_min = "1s"',
                'retry_max = "2s"',
            ]
        )
        return await startRelay(self, extra=extra + "\n")

    async def test_deliveredToMX(self) -> None:
        sink = await startScriptedSink(self)
        relay = await self.relayWithDNS(
            {
                "customer.example": {"MX": [(10, "mx.customer.example")]},
                "mx.customer.example": {"A": ["127.0.0.1"]},
            },
            sink.port,
        )
        nid = await deferToThread(submit, relay, [ALICE])
        trail = await waitForTrail(relay, nid, 1)
        self.assertEqual(
            [code for _, code in trail],
            ["CAAS_RECEIVED", "CAAS_SENT", "CH_RECEIVED", "CH_SENT"],
        )
        (received,) = sink.messages
        self.assertEqual(list(received.recipients), [ALICE])

    async def test_nullMXFailsAtOnce(self) -> None:
        sink = await startScriptedSink(self)
        relay = await self.relayWithDNS(
            {
                "customer.example": {"MX": [(0, ".")]},
                SENDER_DOMAIN: {"MX": [(10, "mx.acme.example")]},
                "mx.acme.example": {"A": ["127.0.0.1"]},
            },
            sink.port,
        )
        nid = await deferToThread(submit, relay, [ALICE])
        trail = await waitForTrail(relay, nid, 1)
        self.assertEqual([code for _, code in trail], ["CAAS_RECEIVED", "CAAS_SENT", "CH_FAILED"])
        (failed,) = [e for e in await relay.store.statusTrail(nid) if e.status_code == "CH_FAILED"]
        self.assertIn("null MX", failed.status_text)
        # The bounce went to the sender's own MX: the sink.
        await waitFor(lambda: len(sink.messages) == 1)
        self.assertEqual(list(sink.messages[0].recipients), [SENDER])

    async def test_privateMXRefused(self) -> None:
        """An MX whose only address is inside the relay's network (not allowed here) is never
        connected to: the recipient fails."""
        sink = await startScriptedSink(self)
        dns = await startDNSServer(
            self,
            {
                "customer.example": {"MX": [(10, "mx.customer.example")]},
                "mx.customer.example": {"A": ["127.0.0.1"]},
            },
        )
        extra = (
            f'[delivery]\nmode = "mx"\nnameservers = ["{dns.nameserver}"]\nmx_port = {sink.port}\n'
        )
        relay = await startRelay(self, extra=extra)
        await relay.updateAccount(bounces=False)
        nid = await deferToThread(submit, relay, [ALICE])
        trail = await waitForTrail(relay, nid, 1)
        self.assertEqual(trail[-1], (ALICE, "CH_FAILED"))
        self.assertEqual(sink.messages, [])
        self.assertEqual(sink.connections, [])


class ConfigTests(TestCase):
    def test_smarthostMustBeTCP(self) -> None:
        from mailrelay.config import ConfigError, configFromSource

        with self.assertRaises(ConfigError) as caught:
            configFromSource('[delivery]\nmode = "smarthost"\nsmarthost = "unix:/tmp/x"\n')
        self.assertIn("delivery.smarthost", str(caught.exception))


class StopTests(TestCase):
    """A stop lets attempts in flight finish within the deadline, then gives their leases
    back: the message is due again at once, its attempt not counted."""

    timeout = 30

    async def test_stopReleasesLeaseOfStalledAttempt(self) -> None:
        from pathlib import Path

        from mailrelay.config import DeliveryConfig
        from mailrelay.delivery.engine import DeliveryEngine
        from mailrelay.delivery.router import SmarthostRouter
        from mailrelay.delivery.schedule import RetrySchedule
        from mailrelay.delivery.service import DeliveryService, LoopSettings
        from mailrelay.delivery.smtp.pool import SMTPClientPool
        from mailrelay.model import Notification, Recipient
        from mailrelay.store.sqlite import SQLiteStore
        from tests.smtp_sinks import Delayed

        sink = await startScriptedSink(self, replies={"END": Delayed(60, "250 2.0.0 OK")})
        directory = Path(self.mktemp())
        directory.mkdir()
        store = SQLiteStore(directory / "mailrelay.sqlite3", reactor)
        await store.open()
        self.addCleanup(store.close)
        await store.addAccount(ACCOUNT, "x")
        nid = store.nextNotificationId()
        body = f"From: {SENDER}\r\nSubject: stalled\r\n\r\nHello.\r\n".encode()
        await store.enqueue(
            Notification(
                nid,
                ACCOUNT,
                SENDER,
                (Recipient(ALICE, "email"),),
                len(body),
                fromTimestamp(reactor.seconds()),
            ),
            body,
        )
        config = DeliveryConfig(
            mode="smarthost",
            smarthost=f"tcp:host=127.0.0.1:port={sink.port}",
            smarthost_tls="none",
        )
        pool = SMTPClientPool(reactor, heloName="relay.test")
        engine = DeliveryEngine(
            store,
            SmarthostRouter(config),
            pool,
            reactor,
            hostname="relay.test",
            schedule=RetrySchedule.fromConfig(config),
        )
        service = DeliveryService(
            store,
            engine,
            reactor,
            LoopSettings(stopDeadline=0.5, pollInterval=0.05),
            closePool=pool.close,
        )
        service.startService()
        await waitFor(lambda: len(sink.messages) == 1)
        self.assertEqual(service.inFlight, 1)
        started = reactor.seconds()
        await service.stopService()
        self.assertLess(reactor.seconds() - started, 5)
        item = await store.queueItem(nid)
        assert item is not None
        self.assertIn(item.state, ("queued", "deferred"))
        self.assertEqual(item.attempts, 0)
        self.assertLessEqual(item.next_attempt.timestamp(), reactor.seconds())
        trail = [event.status_code for event in await store.statusTrail(nid)]
        self.assertEqual(trail, ["CAAS_RECEIVED", "CAAS_SENT"])


class TLSPolicyTests(TestCase):
    timeout = 60

    async def test_verifyPolicyWithoutStarttlsDefers(self) -> None:
        """A domain whose policy says verify is not sent to in clear when its MX offers no
        STARTTLS: the recipient is deferred, nothing reaches the server."""
        sink = await startScriptedSink(self)
        dns = await startDNSServer(
            self,
            {
                "customer.example": {"MX": [(10, "mx.customer.example")]},
                "mx.customer.example": {"A": ["127.0.0.1"]},
            },
        )
        extra = "\n".join(
            [
                "[delivery]",
                'mode = "mx"',
                f'nameservers = ["{dns.nameserver}"]',
                f"mx_port = {sink.port}",
                'allow_networks = ["127.0.0.0/8"]',
                "[delivery.tls_policy]",
                '"customer.example" = "verify"',
            ]
        )
        relay = await startRelay(self, extra=extra + "\n")
        nid = await deferToThread(submit, relay, [ALICE])
        deadline = reactor.seconds() + 20
        while (ALICE, "CH_DEFERRED") not in await trailOf(relay, nid):
            self.assertLess(reactor.seconds(), deadline, await trailOf(relay, nid))
            await deferLater(reactor, 0.05, lambda: None)
        (deferred,) = [
            e for e in await relay.store.statusTrail(nid) if e.status_code == "CH_DEFERRED"
        ]
        self.assertIn("TLS", deferred.status_text)
        self.assertEqual(sink.messages, [])
        self.assertNotIn("MAIL", sink.transactionCommands)


class OperationsTests(TestCase):
    timeout = 60

    async def test_healthAndMetricsReportDelivery(self) -> None:
        import json

        import treq

        sink = await startScriptedSink(self)
        relay = await startRelay(self, extra=smarthostConfig(sink.port))
        nid = await deferToThread(submit, relay, [ALICE])
        await waitForTrail(relay, nid, 1)
        base = f"http://127.0.0.1:{relay.ports['web']}"
        health = json.loads(await (await treq.get(f"{base}/healthz", persistent=False)).text())
        self.assertEqual(health["status"], "ok")
        self.assertEqual(health["delivery"]["mode"], "smarthost")
        self.assertTrue(health["delivery"]["running"])
        text = await (await treq.get(f"{base}/metrics", persistent=False)).text()
        self.assertRegex(text, r'mailrelay_deliveries_total\{outcome="delivered"\} [1-9]')
        self.assertIn("mailrelay_queue_oldest_due_seconds 0.0", text)

    async def test_retentionExpiresDeliveredNotifications(self) -> None:
        """The retention timer forgets a delivered notification once it is older than
        status_retention_days, and never one still queued."""
        from datetime import timedelta

        from twisted.internet.task import Clock

        from mailrelay.retention import RetentionService

        sink = await startScriptedSink(self, replies={f"RCPT:{BOB}": "451 4.2.0 Mailbox busy"})
        relay = await startRelay(self, extra=smarthostConfig(sink.port))
        delivered = await deferToThread(submit, relay, [ALICE])
        queued = await deferToThread(submit, relay, [BOB])
        await waitForTrail(relay, delivered, 1)
        clock = Clock()
        clock.advance(reactor.seconds() + timedelta(days=8).total_seconds())
        service = RetentionService(relay.store, 7, clock, interval=60)
        service.startService()
        self.addCleanup(service.stopService)
        clock.advance(60)
        deadline = reactor.seconds() + 10
        while await relay.store.getNotification(delivered) is not None:
            self.assertLess(reactor.seconds(), deadline, "not expired")
            await deferLater(reactor, 0.05, lambda: None)
        self.assertIsNotNone(await relay.store.getNotification(queued))
        self.assertIsNotNone(await relay.store.queueItem(queued))
