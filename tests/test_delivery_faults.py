"""
Delivery under faults, with the relay as a real ``twistd`` child process: SIGKILLed in the middle
of delivering (everything is delivered after a restart, nothing lost; duplicates counted), and
two relays sharing one Redis server splitting 2,000 messages between them, each delivered once.
"""

from __future__ import annotations

import collections
import re
import signal
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailrelay.model import Notification, Recipient, fromTimestamp
from tests.relay_fixture import (
    ACCOUNT,
    SENDER,
    Listener,
    RelayFiles,
    RelayProcess,
    addAccount,
    freePort,
    startRedisServer,
)
from tests.smtp_sinks import Delayed, startScriptedSink

SEQUENCE = re.compile(rb"^Subject: message (\d+)\r$", re.MULTILINE)


def letter(number: int) -> bytes:
    return (
        f"From: {SENDER}\r\nTo: rcpt{number}@customer.example\r\n"
        f"Subject: message {number}\r\nMessage-ID: <{number}@acme.example>\r\n\r\n"
        f"Body of message {number}.\r\n"
    ).encode()


async def enqueueMessages(files: RelayFiles, count: int) -> None:
    """Put ``count`` notifications straight into the relay's store (what the intake does
    after its checks), with the test account."""
    store = files.makeStore()
    await store.open()
    try:
        await addAccount(store)
        for number in range(count):
            now = fromTimestamp(reactor.seconds())
            body = letter(number)
            await store.enqueue(
                Notification(
                    notification_id=store.nextNotificationId(),
                    account=ACCOUNT,
                    sender=SENDER,
                    recipients=(Recipient(f"rcpt{number}@customer.example", "email"),),
                    size=len(body),
                    received_at=now,
                ),
                body,
            )
    finally:
        await store.close()


def numbersReceived(sink: Any) -> collections.Counter[int]:
    counts: collections.Counter[int] = collections.Counter()
    for received in sink.messages:
        match = SEQUENCE.search(received.message)
        assert match is not None, received.message[:200]
        counts[int(match.group(1))] += 1
    return counts


class FaultTestCase(TestCase):
    timeout = 120

    def relayFiles(self, directory: Path, extra: str) -> tuple[RelayFiles, int]:
        port = freePort()
        files = RelayFiles(
            directory,
            [Listener("plain", "none", endpoint=f"tcp:{port}:interface=127.0.0.1")],
            extra,
        )
        return files, port

    async def startProcess(self, files: RelayFiles, port: int, name: str) -> RelayProcess:
        process = RelayProcess(files, name)
        process.start()
        self.addCleanup(lambda: process.signal(signal.SIGKILL) if process.process else None)
        await deferToThread(process.waitUntilServing, port)
        return process

    async def waitFor(self, condition: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}")
            await deferLater(reactor, 0.1, lambda: None)


class KillMidDeliveryTests(FaultTestCase):
    async def test_sigkillMidDelivery(self) -> None:
        """SIGKILL while deliveries are in flight; after a restart every recipient is
        delivered and the queue is empty. Duplicates (a remote 250 whose outcome was not yet
        recorded) are counted and reported, never a loss."""
        count = 60
        sink = await startScriptedSink(self, replies={"END": Delayed(0.2, "250 2.0.0 OK")})
        extra = (
            f'[delivery]\nmode = "smarthost"\nsmarthost = "tcp:host=127.0.0.1:port={sink.port}"\n'
            'smarthost_tls = "none"\nlease = "2s"\nmax_connections_per_destination = 4\n'
        )
        files, port = self.relayFiles(Path(self.mktemp()), extra)
        await enqueueMessages(files, count)
        first = await self.startProcess(files, port, "first")
        await self.waitFor(lambda: len(sink.messages) >= 5, 30, "the first deliveries")
        self.assertEqual(await deferToThread(first.signal, signal.SIGKILL), -signal.SIGKILL)
        deliveredBefore = len(numbersReceived(sink))
        self.assertLess(deliveredBefore, count, "killed too late to be mid-delivery")

        second = await self.startProcess(files, port, "second")
        await self.waitFor(lambda: len(numbersReceived(sink)) == count, 60, "every delivery")
        await deferLater(reactor, 1.0, lambda: None)  # let the last outcomes be recorded
        status = await deferToThread(second.signal, signal.SIGTERM)
        self.assertIn(status, (0, -signal.SIGTERM), second.log())

        received = numbersReceived(sink)
        self.assertEqual(set(received), set(range(count)))
        duplicates = sum(n - 1 for n in received.values())
        # Only deliveries the sink took but whose outcome was not yet recorded can go twice:
        # on each of the 4 connections the one waiting for its 250, and those answered but
        # still in the writer's queue at the kill (more on a loaded machine). Never most.
        self.assertLess(duplicates, count // 3)
        print(f"\nkilled after {deliveredBefore}/{count} delivered; duplicates: {duplicates}")
        store = files.makeStore()
        await store.open()
        self.addCleanup(store.close)
        stats = await store.stats()
        self.assertEqual((stats.queued, stats.deferred, stats.in_flight), (0, 0, 0))


class TwoRelaysOneRedisTests(FaultTestCase):
    async def test_twoRelaysDeliverEachOnce(self) -> None:
        count = 2000
        _, redisPort = startRedisServer(self)
        sink = await startScriptedSink(self)
        extra = (
            f'[store]\nbackend = "redis"\nredis_url = "redis://127.0.0.1:{redisPort}/0"\n'
            f'[delivery]\nmode = "smarthost"\nsmarthost = "tcp:host=127.0.0.1:port={sink.port}"\n'
            'smarthost_tls = "none"\n'
        )
        directory = Path(self.mktemp())
        filesA, portA = self.relayFiles(directory / "a", extra)
        filesB, portB = self.relayFiles(directory / "b", extra)
        for files, name in ((filesA, "relay-a.test"), (filesB, "relay-b.test")):
            text = files.configPath.read_text().replace(
                'hostname = "relay.test"', f'hostname = "{name}"'
            )
            files.configPath.write_text(text)
        await enqueueMessages(filesA, count)
        relays = [
            await self.startProcess(filesA, portA, "a"),
            await self.startProcess(filesB, portB, "b"),
        ]
        await self.waitFor(lambda: len(sink.messages) >= count, 90, f"{count} deliveries")
        await deferLater(reactor, 1.0, lambda: None)  # anything more would be a duplicate
        for relay in relays:
            await deferToThread(relay.signal, signal.SIGTERM)
        received = numbersReceived(sink)
        self.assertEqual(set(received), set(range(count)))
        self.assertEqual([n for n, times in received.items() if times > 1], [])
        helos = {}
        for connection, line in sink.commands:
            verb, _, argument = line.partition(" ")
            if verb.upper() in ("EHLO", "HELO"):
                helos[connection] = argument
        byRelay = collections.Counter(helos[m.connection] for m in sink.messages)
        self.assertEqual(set(byRelay), {"relay-a.test", "relay-b.test"}, byRelay)
        print(f"\n{count} messages, each delivered once: {dict(byRelay)}")


class WorkersTests(FaultTestCase):
    async def test_messagesAcceptedByWorkersAreDeliveredOnce(self) -> None:
        """With workers = 2 the worker process keeps its own file of notifications and
        delivers them itself (the main process leaves that file to it): all delivered, each
        once."""
        import dataclasses
        import re
        import smtplib

        import treq

        count = 40
        sink = await startScriptedSink(self)
        port, webPort = freePort(), freePort()
        files = RelayFiles(
            Path(self.mktemp()),
            [
                Listener(
                    "network", "none", auth="network", endpoint=f"tcp:{port}:interface=127.0.0.1"
                )
            ],
            f'[delivery]\nmode = "smarthost"\n'
            f'smarthost = "tcp:host=127.0.0.1:port={sink.port}"\nsmarthost_tls = "none"\n',
            webEndpoint=f"tcp:{webPort}:interface=127.0.0.1",
            workers=2,
        )
        store = files.makeStore()
        await store.open()
        try:
            credentials = await addAccount(store)
            await store.updateAccount(
                dataclasses.replace(credentials.account, networks=("127.0.0.0/8",))
            )
        finally:
            await store.close()
        relay = await self.startProcess(files, port, "workers")

        # The worker serves once its own file exists (it makes it as it starts).
        await self.waitFor(
            lambda: bool(list(files.dataDir.glob("*.worker-1.sqlite3"))), 15, "the worker"
        )
        await deferLater(reactor, 0.5, lambda: None)

        def submitAll() -> None:
            # Eight sessions open at once, so that the processes share them out.
            sessions = [smtplib.SMTP("127.0.0.1", port, timeout=10) for _ in range(8)]
            for number in range(count):
                sessions[number % 8].sendmail(
                    SENDER, [f"rcpt{number}@customer.example"], letter(number)
                )
            for smtp in sessions:
                smtp.quit()

        await deferToThread(submitAll)
        await self.waitFor(lambda: len(sink.messages) >= count, 30, "every delivery")
        # Both processes' attempts on the main process's /metrics (a worker's count arrives
        # within a second).
        await deferLater(reactor, 1.5, lambda: None)
        response = await treq.get(f"http://127.0.0.1:{webPort}/metrics", persistent=False)
        metrics = await response.text()
        delivered = re.search(r'mailrelay_deliveries_total\{outcome="delivered"\} (\S+)', metrics)
        self.assertIsNotNone(delivered, metrics)
        assert delivered is not None
        self.assertEqual(float(delivered.group(1)), count)
        await deferToThread(relay.signal, signal.SIGTERM)
        received = numbersReceived(sink)
        self.assertEqual(set(received), set(range(count)))
        self.assertEqual([n for n, times in received.items() if times > 1], [])
        import sqlite3

        (workerFile,) = files.dataDir.glob("*.worker-1.sqlite3")
        with sqlite3.connect(workerFile) as connection:
            (accepted,) = connection.execute("SELECT COUNT(*) FROM notifications").fetchone()
        # Connections are shared out between the two processes: some went to the worker.
        self.assertGreater(accepted, 0)
        self.assertLess(accepted, count)
