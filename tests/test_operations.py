"""
Issue 22's operations with real processes: ``twistd mailrelay`` drained by SIGTERM under
load, reloaded by SIGHUP (a renewed certificate, a broken config), telling systemd its states
through a real ``NOTIFY_SOCKET``, writing the mail log (text and JSON), and serving a
``haproxy:`` listener from several worker processes. Unit tests of the pieces come first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from io import StringIO
from pathlib import Path
from typing import Any

import trustme
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailrelay import maillog
from mailrelay.lifecycle import SignalService
from mailrelay.sdnotify import Notifier
from mailrelay.smtp import replies
from mailrelay.smtp.proxy import HEADER_TIMEOUT, ProxyHeaderFactory
from mailrelay.smtp.sessions import SessionRegistry
from tests.relay_fixture import (
    HOSTNAME,
    SENDER,
    Listener,
    RelayFiles,
    RelayProcess,
    WireClient,
    addAccount,
    freePort,
)
from tests.smtp_fixture import SENDER_DOMAIN, MemoryProtocolHarness

ACCEPTED = re.compile(r"2\.0\.0 OK id=(\d+)")


# -- units -------------------------------------------------------------------------------


class _Session:
    def __init__(self, registry: SessionRegistry, busy: bool) -> None:
        self.registry = registry
        self.busy = busy
        self.events: list[str] = []

    def drain(self) -> None:
        self.events.append("drain")
        if not self.busy:
            self.registry.discard(self)

    def abortForShutdown(self) -> None:
        self.events.append("abort")
        self.registry.discard(self)


class SessionRegistryTests(SynchronousTestCase):
    def test_idleSessionsCloseBusyOnesFinish(self) -> None:
        clock = Clock()
        registry = SessionRegistry(clock)
        idle, busy = _Session(registry, False), _Session(registry, True)
        registry.add(idle)
        registry.add(busy)
        done = registry.drain(10)
        self.assertEqual((idle.events, busy.events), (["drain"], ["drain"]))
        self.assertNoResult(done)
        clock.advance(5)
        registry.discard(busy)  # its message was stored and answered, then it closed
        self.assertEqual(self.successResultOf(done), 0)
        self.assertEqual(busy.events, ["drain"])

    def test_deadlineClosesTheRest(self) -> None:
        clock = Clock()
        registry = SessionRegistry(clock)
        busy = _Session(registry, True)
        registry.add(busy)
        done = registry.drain(10)
        clock.advance(9.9)
        self.assertNoResult(done)
        clock.advance(0.1)
        self.assertEqual(self.successResultOf(done), 1)
        self.assertEqual(busy.events, ["drain", "abort"])

    def test_nothingOpen(self) -> None:
        registry = SessionRegistry(Clock())
        self.assertEqual(self.successResultOf(registry.drain(10)), 0)
        self.assertTrue(registry.draining)


class NotifierTests(SynchronousTestCase):
    def test_datagrams(self) -> None:
        path = Path(self.mktemp())
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
            server.bind(str(path))
            notifier = Notifier({"NOTIFY_SOCKET": str(path)})
            self.assertTrue(notifier.ready())
            self.assertIn(b"READY=1", server.recv(4096).split(b"\n"))
            self.assertTrue(notifier.stopping())
            self.assertIn(b"STOPPING=1", server.recv(4096).split(b"\n"))

    def test_abstractSocket(self) -> None:
        name = f"mailrelay-test-{os.getpid()}-{time.monotonic_ns()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
            server.bind("\0" + name)
            self.assertTrue(Notifier({"NOTIFY_SOCKET": "@" + name}).notify("READY=1"))
            self.assertEqual(server.recv(4096), b"READY=1")

    def test_withoutSystemd(self) -> None:
        notifier = Notifier({})
        self.assertFalse(notifier.enabled)
        self.assertFalse(notifier.ready())
        self.assertIsNone(notifier.startWatchdog(Clock()))

    def test_watchdog(self) -> None:
        path = Path(self.mktemp())
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
            server.bind(str(path))
            server.setblocking(False)
            environ = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"}
            clock = Clock()
            call = Notifier(environ).startWatchdog(clock)
            assert call is not None
            self.addCleanup(call.stop)
            clock.advance(1.0)
            self.assertEqual([server.recv(64), server.recv(64)], [b"WATCHDOG=1"] * 2)
            other = {**environ, "WATCHDOG_PID": str(os.getpid() + 1)}
            self.assertIsNone(Notifier(other).startWatchdog(clock))


class MailLogTests(SynchronousTestCase):
    def collect(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def test_messageLine(self) -> None:
        events = self.collect()
        maillog.message(
            notificationId="42",
            account="acme",
            client="192.0.2.1",
            tls="TLSv1.3",
            size=2048,
            recipients=3,
            code=250,
            dsn="2.0.0",
        )
        maillog.message(
            notificationId=None,
            account=None,
            client="192.0.2.1",
            tls=None,
            size=30000000,
            recipients=1,
            code=552,
            dsn="5.3.4",
        )
        texts = [formatEvent(e) for e in events if e["log_namespace"] == maillog.NAMESPACE]
        self.assertEqual(
            texts,
            [
                "message 42 accepted account=acme client=192.0.2.1 tls=TLSv1.3 size=2048 "
                "nrcpt=3 reply=250 2.0.0",
                "message - refused account=- client=192.0.2.1 tls=none size=30000000 "
                "nrcpt=1 reply=552 5.3.4",
            ],
        )

    def test_jsonLines(self) -> None:
        out = StringIO()
        observer = maillog.jsonLinesObserver(out)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        maillog.delivery(
            notificationId="42",
            recipient="bob@customer.example",
            relay="mx.customer.example",
            status="deferred",
            dsn="4.2.0",
            delay=12.34,
            reply="mx.customer.example: 451 4.2.0 try later",
        )
        (line,) = [json.loads(text) for text in out.getvalue().splitlines()]
        self.assertEqual(line["namespace"], maillog.NAMESPACE)
        self.assertEqual(line["level"], LogLevel.info.name)
        self.assertEqual(line["recipient"], "bob@customer.example")
        self.assertEqual(line["status"], "deferred")
        self.assertEqual(line["delay"], 12.34)
        self.assertTrue(line["time"].endswith("Z"))
        self.assertEqual(
            line["text"],
            "delivery 42 to=bob@customer.example relay=mx.customer.example status=deferred "
            "dsn=4.2.0 delay=12.3s (mx.customer.example: 451 4.2.0 try later)",
        )


class _Writes(StringIO):
    """A log file that keeps each write apart, to count the system calls they would be."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


class LogOutputTests(TestCase):
    """The log's lines: a reactor turn's lines written together once the turn is over;
    errors, other threads' lines and lines outside a running reactor at once."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()  # whose turns count; its clock runs them
        self.reactor.running = True
        self.out = _Writes()

    async def onTheReactorThread(self) -> None:
        """Carry on in a turn of trial's reactor: on the thread a reactor runs on (trial
        starts a test before its reactor runs)."""
        await deferLater(reactor, 0)

    def event(self, text: str, level: LogLevel = LogLevel.info) -> dict[str, Any]:
        return {
            "log_format": maillog.PREFORMATTED,
            "text": text,
            "log_level": level,
            "log_namespace": "test",
            "log_time": 1_800_000_000.0,
        }

    async def test_aTurnsLinesAreOneWrite(self) -> None:
        await self.onTheReactorThread()
        observer = maillog.textLinesObserver(self.out, reactor=self.reactor)
        for n in range(3):
            observer(self.event(f"line {n}"))
        self.assertEqual(self.out.writes, [])
        self.reactor.advance(0)  # the turn is over
        (written,) = self.out.writes
        self.assertEqual(
            written.splitlines(),
            [f"2027-01-15T08:00:00+0000 [test#info] line {n}" for n in range(3)],
        )

    async def test_anErrorComesOutAtOnceAfterWhatWaits(self) -> None:
        await self.onTheReactorThread()
        observer = maillog.jsonLinesObserver(self.out, reactor=self.reactor)
        observer(self.event("first"))
        observer(self.event("broken", LogLevel.error))
        texts = [json.loads(line)["text"] for line in self.out.getvalue().splitlines()]
        self.assertEqual(texts, ["first", "broken"])
        self.assertEqual(len(self.out.writes), 1)

    async def test_whatWaitsIsWrittenAtShutdown(self) -> None:
        await self.onTheReactorThread()
        observer = maillog.textLinesObserver(self.out, stamped=False, reactor=self.reactor)
        observer(self.event("last words"))
        ((flush, args, kwargs),) = self.reactor.triggers["after"]["shutdown"]
        self.assertEqual(self.out.writes, [])
        flush(*args, **kwargs)  # the reactor stopped before the turn's end
        self.assertEqual(self.out.writes, ["[test#info] last words\n"])

    async def test_anotherThreadsLineComesOutAtOnce(self) -> None:
        observer = maillog.textLinesObserver(self.out, stamped=False, reactor=self.reactor)

        def inAThread() -> str:
            observer(self.event("thread's"))
            return self.out.getvalue()

        self.assertEqual(await deferToThread(inAThread), "[test#info] thread's\n")

    def test_withoutARunningReactorAtOnce(self) -> None:
        self.reactor.running = False
        output = maillog.TurnOutput(self.out, self.reactor)
        output.write("a\n")
        output.write("b\n")
        self.assertEqual(self.out.writes, ["a\n", "b\n"])


# -- real processes ----------------------------------------------------------------------


class _Signals:
    """What SignalService uses of the signal module, keeping the handlers it sets."""

    SIGTERM = signal.SIGTERM
    SIGHUP = signal.SIGHUP

    def __init__(self) -> None:
        self.handlers: dict[int, Any] = {}

    def signal(self, number: int, handler: Any) -> None:
        self.handlers[number] = handler

    def send(self, number: int) -> None:
        self.handlers[number](number, None)


class _ThreadCalls:
    """A reactor's callFromThread, run at once (a signal handler's call)."""

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)


class SignalServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.signals = _Signals()
        self.reloads: list[None] = []
        self.service = SignalService(
            _ThreadCalls(), lambda: self.reloads.append(None), signals=self.signals
        )

    def test_reloadAskedAsTheRelayStartsRunsOnceInstalled(self) -> None:
        """A SIGHUP (two, even) before the reactor runs is one reload once it does, not the
        end of the process; after that each SIGHUP is a reload."""
        self.service.keepEarlyReloads()
        self.signals.send(signal.SIGHUP)
        self.signals.send(signal.SIGHUP)
        self.assertEqual(self.reloads, [])
        self.service.install()
        self.assertEqual(len(self.reloads), 1)
        self.signals.send(signal.SIGHUP)
        self.assertEqual(len(self.reloads), 2)

    def test_noReloadWithoutASignal(self) -> None:
        self.service.keepEarlyReloads()
        self.service.install()
        self.assertEqual(self.reloads, [])


class OperatedRelay(RelayProcess):
    """A :class:`RelayProcess` with extra twistd plugin arguments and environment."""

    def __init__(
        self,
        files: RelayFiles,
        name: str = "relay",
        arguments: tuple[str, ...] = (),
        environment: dict[str, str] | None = None,
    ) -> None:
        super().__init__(files, name)
        self.arguments = arguments
        self.extraEnvironment = environment or {}

    def start(self) -> None:
        import subprocess

        from tests.relay_fixture import REPO_ROOT

        with open(self.logPath, "ab") as log:
            self.process = subprocess.Popen(
                [*self.command(self.files.configPath), *self.arguments],
                cwd=REPO_ROOT,
                env={**self.environment(), **self.extraEnvironment},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def waitForLog(self, text: str, count: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the log {count} times:\n{self.log()}")
            time.sleep(0.05)


async def prepareStore(files: RelayFiles, networks: tuple[str, ...] = ("127.0.0.0/8",)) -> None:
    """The test account, submitting from ``networks`` without AUTH (relay by IP)."""
    store = files.makeStore()
    await store.open()
    try:
        credentials = await addAccount(store)
        await store.updateAccount(replace(credentials.account, networks=networks))
    finally:
        await store.close()


def storedIds(files: RelayFiles) -> set[str]:
    ids: set[str] = set()
    for path in files.dataDir.glob("mailrelay*.sqlite3"):
        database = sqlite3.connect(path)
        try:
            ids |= {str(row[0]) for row in database.execute("SELECT id FROM notifications")}
        finally:
            database.close()
    return ids


@dataclass
class ClientRecord:
    accepted: list[str] = field(default_factory=list)
    shutdownReplies: int = 0
    refusedToConnect: bool = False
    resetInData: list[str] = field(default_factory=list)
    otherProblems: list[str] = field(default_factory=list)


def slowClient(port: int, record: ClientRecord, stop: threading.Event, pieces: int = 5) -> None:
    """Send messages one after another, each DATA section in ``pieces`` writes with pauses
    between, until the relay answers 421 or ``stop`` is set."""
    body = (b"x" * 400 + b"\r\n") * 5
    while not stop.is_set():
        try:
            client = WireClient(port)
        except OSError:
            record.refusedToConnect = True
            return
        with client:
            try:
                if client.reply().code != 220:
                    return
                if client.command("EHLO client.test").code != 250:
                    return
                while not stop.is_set():
                    reply = client.command(f"MAIL FROM:<{SENDER}>")
                    if reply.code == 421:
                        record.shutdownReplies += reply.matches(replies.SHUTTING_DOWN)
                        return
                    assert reply.code == 250, reply
                    reply = client.command("RCPT TO:<someone@customer.example>")
                    if reply.code == 421:
                        record.shutdownReplies += reply.matches(replies.SHUTTING_DOWN)
                        return
                    reply = client.command("DATA")
                    if reply.code == 421:
                        record.shutdownReplies += reply.matches(replies.SHUTTING_DOWN)
                        return
                    assert reply.code == 354, reply
                    try:
                        client.send(f"From: {SENDER}\r\nSubject: drain\r\n\r\n".encode())
                        for _ in range(pieces):
                            time.sleep(0.05)
                            client.send(body)
                        client.send(b".\r\n")
                        reply = client.reply()
                    except (ConnectionError, OSError) as e:
                        record.resetInData.append(repr(e))
                        return
                    match = ACCEPTED.search(reply.text)
                    if reply.code == 250 and match:
                        record.accepted.append(match.group(1))
                    else:
                        record.otherProblems.append(f"end of data: {reply}")
                        return
            except (ConnectionError, OSError) as e:
                # Between messages: no message lost, but the relay should have said 421.
                record.otherProblems.append(f"outside DATA: {e!r}")
                return


async def startOperatedRelay(
    testCase: TestCase, security: str, extra: str = "", workers: int = 1
) -> tuple[RelayFiles, OperatedRelay, int]:
    """A relay by IP on one listener (``security`` "none" or "tls") of a free port, ``extra``
    TOML appended, killed at the test's end; returns once it (and every worker) serves."""
    port = freePort()
    name = "tls" if security == "tls" else "network"
    files = RelayFiles(
        Path(testCase.mktemp()),
        [Listener(name, security, "network", f"tcp:{port}:interface=127.0.0.1")],
        extra=extra,
        workers=workers,
    )
    await prepareStore(files)
    relay = OperatedRelay(files)
    await deferToThread(relay.start)
    testCase.addCleanup(deferToThread, relay.signal, signal.SIGKILL)
    # A TLS listener's greeting comes after the handshake: only a connection is waited for.
    ready = waitForConnection if security == "tls" else relay.waitUntilServing
    await deferToThread(ready, port)
    if workers > 1:
        await deferToThread(relay.waitForLog, "worker 1 serving")
    return files, relay, port


def waitForConnection(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class DrainTests(TestCase):
    timeout = 120

    async def startRelay(
        self, extra: str = "", workers: int = 1
    ) -> tuple[RelayFiles, OperatedRelay, int]:
        return await startOperatedRelay(self, "none", extra, workers)

    async def test_sigtermUnderLoad(self) -> None:
        """SIGTERM while 8 clients send: the relay exits 0; every message answered 250 is in
        the store and in the mail log; no client is cut off inside DATA; the clients that
        go on get 421 4.3.2."""
        files, relay, port = await self.startRelay("[limits]\ndrain_timeout = 20\n", workers=2)
        stop = threading.Event()
        records = [ClientRecord() for _ in range(8)]
        threads = [
            threading.Thread(target=slowClient, args=(port, record, stop), daemon=True)
            for record in records
        ]
        for thread in threads:
            thread.start()
        await deferToThread(time.sleep, 1.5)
        status = await deferToThread(relay.signal, signal.SIGTERM, 60)
        stop.set()
        for thread in threads:
            await deferToThread(thread.join, 20)
        log = relay.log()
        self.assertEqual(status, 0, log)
        accepted = [i for record in records for i in record.accepted]
        self.assertGreater(len(accepted), 8, log)
        self.assertEqual(set(accepted) - storedIds(files), set(), log)
        self.assertEqual([r.resetInData for r in records if r.resetInData], [], log)
        self.assertEqual([r.otherProblems for r in records if r.otherProblems], [], log)
        self.assertGreater(sum(r.shutdownReplies for r in records), 0, log)
        for notificationId in accepted:
            self.assertRegex(
                log,
                rf"message {notificationId} accepted account=acme client=127\.0\.0\.1 "
                r"tls=none size=\d+ nrcpt=1 reply=250 2\.0\.0",
            )
        self.assertNotIn("Traceback", log)
        self.assertNotIn("ReactorNotRunning", log)

    async def test_deadline(self) -> None:
        """A client that stalls inside DATA is closed at the drain deadline (with a 421) and
        the relay exits 0 soon after."""
        _, relay, port = await self.startRelay("[limits]\ndrain_timeout = 2\n")

        def stall() -> tuple[float, bytes]:
            with WireClient(port) as client:
                client.reply()
                client.command("EHLO client.test")
                client.command(f"MAIL FROM:<{SENDER}>")
                client.command("RCPT TO:<someone@customer.example>")
                assert client.command("DATA").code == 354
                client.send(b"Subject: stalled\r\n\r\nhalf a message")
                started = time.monotonic()
                relay.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                received = client.readUntilClosed()
                return time.monotonic() - started, received

        waited, received = await deferToThread(stall)
        status = await deferToThread(relay.signal, signal.SIGTERM, 30)
        self.assertEqual(status, 0, relay.log())
        self.assertTrue(received.startswith(b"421 4.3.2 "), received)
        self.assertGreaterEqual(waited, 1.5)
        self.assertIn("closing 1 SMTP sessions still open", relay.log())


class ReloadTests(TestCase):
    timeout = 90

    async def startRelay(self, workers: int = 1) -> tuple[RelayFiles, OperatedRelay, int]:
        return await startOperatedRelay(self, "tls", workers=workers)

    @staticmethod
    def tlsClient(files: RelayFiles, port: int, caPath: Path) -> tuple[WireClient, bytes]:
        client = WireClient(port)
        client.startTLS(ssl.create_default_context(cafile=str(caPath)), HOSTNAME)
        certificate = client.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        assert client.reply().code == 220
        return client, certificate

    async def test_sighupNewCertificate(self) -> None:
        """SIGHUP after the certificate files were replaced: a new TLS connection sees the
        new certificate, a session open before goes on (and sends a message) over the old."""
        files, relay, port = await self.startRelay(workers=2)
        before, oldCertificate = await deferToThread(self.tlsClient, files, port, files.caPath)
        self.addCleanup(before.close)
        self.assertEqual((await deferToThread(before.command, "EHLO client.test")).code, 250)

        newCA = trustme.CA()
        newCAPath = files.directory / "new-ca.pem"
        newCA.cert_pem.write_to_path(str(newCAPath))
        issued = newCA.issue_cert(HOSTNAME, "127.0.0.1")
        issued.private_key_pem.write_to_path(str(files.keyPath))
        files.certificatePath.write_bytes(b"".join(p.bytes() for p in issued.cert_chain_pems))
        relay.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        await deferToThread(relay.waitForLog, "reloaded: new sessions get")
        # The worker's line ("#info] reloaded" alone is in the main process's line too).
        await deferToThread(relay.waitForLog, "worker 1: [__main__#info] reloaded")

        # Every process serves the new certificate: several connections, so both take some.
        for _ in range(6):
            after, newCertificate = await deferToThread(self.tlsClient, files, port, newCAPath)
            after.close()
            self.assertNotEqual(newCertificate, oldCertificate)

        def sendOnOldSession() -> str:
            before.command(f"MAIL FROM:<{SENDER}>")
            before.command("RCPT TO:<someone@customer.example>")
            assert before.command("DATA").code == 354
            before.send(f"From: {SENDER}\r\nSubject: reload\r\n\r\nHello\r\n.\r\n".encode())
            return before.reply().text

        self.assertRegex(await deferToThread(sendOnOldSession), ACCEPTED)
        self.assertEqual(relay.process.poll(), None)  # type: ignore[union-attr]

    async def test_reloadStartsDeliveryInEveryProcess(self) -> None:
        """Held mail (the default mode), then SIGHUP with a smarthost: each process switches
        its own delivery loop, so what either process accepted reaches the sink, each once."""
        from tests.smtp_sinks import startScriptedSink

        sink = await startScriptedSink(self)
        files, relay, port = await self.startRelay(workers=2)
        count = 12

        def submitAll() -> list[str]:
            replies = []
            clients = [self.tlsClient(files, port, files.caPath)[0] for _ in range(6)]
            for number in range(count):
                client = clients[number % len(clients)]
                if number < len(clients):
                    client.command("EHLO client.test")
                client.command(f"MAIL FROM:<{SENDER}>")
                client.command(f"RCPT TO:<rcpt{number}@customer.example>")
                assert client.command("DATA").code == 354
                client.send(f"From: {SENDER}\r\nSubject: {number}\r\n\r\nHi\r\n.\r\n".encode())
                replies.append(client.reply().text)
            for client in clients:
                client.close()
            return replies

        for reply in await deferToThread(submitAll):
            self.assertRegex(reply, ACCEPTED)
        workerFile = files.dataDir / "mailrelay.worker-1.sqlite3"
        with sqlite3.connect(workerFile) as connection:
            (inWorker,) = connection.execute("SELECT COUNT(*) FROM queue").fetchone()
        self.assertGreater(inWorker, 0)  # the worker took some: its loop must deliver them
        self.assertEqual(sink.messages, [])

        files.configPath.write_text(
            files.configPath.read_text()
            + f'\n[delivery]\nmode = "smarthost"\nsmarthost = "tcp:host=127.0.0.1:port={sink.port}"'
            + '\nsmarthost_tls = "none"\n'
        )
        relay.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        deadline = time.monotonic() + 30
        while len(sink.messages) < count and time.monotonic() < deadline:
            await deferLater(reactor, 0.1, lambda: None)
        subjects = [re.search(rb"Subject: (\d+)", m.message) for m in sink.messages]
        numbers = sorted(int(found.group(1)) for found in subjects if found is not None)
        self.assertEqual(numbers, list(range(count)))

    async def test_invalidConfigRefused(self) -> None:
        """A config that no longer validates: one log line, the running one kept."""
        files, relay, port = await self.startRelay()
        good = files.configPath.read_text()
        files.configPath.write_text(good + "\n[limits]\nmax_recipients = 0\n")
        relay.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        await deferToThread(relay.waitForLog, "reload refused")
        refusals = [line for line in relay.log().splitlines() if "reload refused" in line]
        self.assertEqual(len(refusals), 1, relay.log())
        self.assertIn("limits.max_recipients", refusals[0])
        client, _ = await deferToThread(self.tlsClient, files, port, files.caPath)
        client.close()
        self.assertEqual(relay.process.poll(), None)  # type: ignore[union-attr]

    async def test_reloadLimits(self) -> None:
        """A changed limit counts for new sessions; a session open before keeps its own."""
        files, relay, port = await self.startRelay()
        before, _ = await deferToThread(self.tlsClient, files, port, files.caPath)
        self.addCleanup(before.close)
        files.configPath.write_text(
            files.configPath.read_text() + "\n[limits]\nmax_message_size = 4096\n"
        )
        relay.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        await deferToThread(relay.waitForLog, "reloaded: new sessions get")
        after, _ = await deferToThread(self.tlsClient, files, port, files.caPath)
        self.addCleanup(after.close)
        oldEhlo = await deferToThread(before.command, "EHLO client.test")
        newEhlo = await deferToThread(after.command, "EHLO client.test")
        self.assertIn("SIZE 20971520", oldEhlo.lines)
        self.assertIn("SIZE 4096", newEhlo.lines)


class SystemdNotifyTests(TestCase):
    timeout = 60

    async def test_readyThenStopping(self) -> None:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        # A socket in /tmp: the test's directory may be deeper than AF_UNIX's 108 bytes.
        socketDirectory = Path(tempfile.mkdtemp(prefix="mailrelay-notify-"))
        self.addCleanup(shutil.rmtree, socketDirectory, True)
        path = socketDirectory / "notify.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(server.close)
        server.bind(str(path))
        server.settimeout(30)
        port = freePort()
        files = RelayFiles(
            directory / "relay",
            [Listener("plain", "none", "required", f"tcp:{port}:interface=127.0.0.1")],
        )
        relay = OperatedRelay(files, environment={"NOTIFY_SOCKET": str(path)})
        await deferToThread(relay.start)
        self.addCleanup(deferToThread, relay.signal, signal.SIGKILL)
        first = (await deferToThread(server.recv, 4096)).split(b"\n")
        self.assertIn(b"READY=1", first)
        # READY=1 means the listeners accept and the store is open: a greeting comes at once.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            self.assertTrue(s.recv(512).startswith(b"220 "))
        relay.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        self.assertIn(b"RELOADING=1", (await deferToThread(server.recv, 4096)).split(b"\n"))
        self.assertIn(b"READY=1", (await deferToThread(server.recv, 4096)).split(b"\n"))
        relay.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        self.assertIn(b"STOPPING=1", (await deferToThread(server.recv, 4096)).split(b"\n"))
        self.assertEqual(await deferToThread(relay.signal, signal.SIGTERM, 30), 0)


class ProxyWorkersTests(TestCase):
    timeout = 90

    async def test_proxyHeaderWithTwoWorkers(self) -> None:
        """``haproxy:tcp:`` with workers = 2: both processes read the PROXY v1 header, and
        the session (the mail log, the stored Received header) has the proxied address."""
        port = freePort()
        files = RelayFiles(
            Path(self.mktemp()),
            [Listener("proxied", "none", "network", f"haproxy:tcp:{port}:interface=127.0.0.1")],
            workers=2,
        )
        # Relay by IP from the proxied addresses only: the proxy's own (127.0.0.1) is not
        # enough, so an accepted message shows the PROXY header was read.
        await prepareStore(files, networks=("203.0.113.0/24",))
        relay = OperatedRelay(files, arguments=("--log-format", "json"))
        await deferToThread(relay.start)
        self.addCleanup(deferToThread, relay.signal, signal.SIGKILL)
        await deferToThread(relay.waitForLog, '"text":"worker 1 serving')

        def session(n: int) -> WireClient:
            client = WireClient(port)
            client.send(f"PROXY TCP4 203.0.113.{n} 192.0.2.1 4{n:04d} 25\r\n".encode())
            assert client.reply().code == 220
            return client

        def sendAll() -> list[str]:
            # Open together so that both processes take some of them.
            clients = [session(n) for n in range(1, 11)]
            ids = []
            for client in clients:
                with client:
                    client.command("EHLO client.test")
                    reply = client.command(f"MAIL FROM:<{SENDER}>")
                    assert reply.code == 250, reply
                    client.command("RCPT TO:<someone@customer.example>")
                    reply = client.command("DATA")
                    assert reply.code == 354, reply
                    client.send(f"From: {SENDER}\r\nSubject: proxied\r\n\r\nHi\r\n.\r\n".encode())
                    match = ACCEPTED.search(client.reply().text)
                    assert match
                    ids.append(match.group(1))
                    client.command("QUIT")
            return ids

        ids = await deferToThread(sendAll)
        self.assertEqual(len(ids), 10)
        await deferToThread(relay.waitForLog, '"outcome":"accepted"', 10)
        lines = [json.loads(line) for line in relay.log().splitlines() if line.startswith("{")]
        messages = [line for line in lines if line.get("outcome") == "accepted"]
        self.assertEqual(
            sorted(m["client"] for m in messages), sorted(f"203.0.113.{n}" for n in range(1, 11))
        )
        # The worker's lines come through the main process with their fields and its index.
        self.assertIn(1, {m.get("worker") for m in messages}, relay.log())
        self.assertIn(None, {m.get("worker") for m in messages}, relay.log())
        received = _storedReceived(files)
        self.assertEqual(len(received), 10)
        for n in range(1, 11):
            self.assertTrue(any(f"203.0.113.{n}" in header for header in received), received)


def _storedReceived(files: RelayFiles) -> list[str]:
    """The header of every message stored inline (small ones are), from every store file."""
    headers = []
    for path in files.dataDir.glob("mailrelay*.sqlite3"):
        database = sqlite3.connect(path)
        try:
            for (body,) in database.execute("SELECT body FROM messages"):
                if body:
                    headers.append(bytes(body).split(b"\r\n\r\n")[0].decode(errors="replace"))
        finally:
            database.close()
    return headers


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.peerAtStart: Any = None
        self.received = b""
        self.lost = False

    def connectionMade(self) -> None:
        self.peerAtStart = self.transport.getPeer()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class ProxyHeaderTests(SynchronousTestCase):
    """The session behind ``haproxy:`` starts once the PROXY header is read."""

    def connect(self, clock: Clock) -> tuple[Any, _Recorder, StringTransport]:
        recorder = _Recorder()
        factory = ProxyHeaderFactory(Factory.forProtocol(lambda: recorder), clock)
        wrapper = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        wrapper.makeConnection(transport)
        return wrapper, recorder, transport

    def test_sessionSeesTheClient(self) -> None:
        wrapper, recorder, _ = self.connect(Clock())
        self.assertIsNone(recorder.peerAtStart)  # not started before the header
        wrapper.dataReceived(b"PROXY TCP4 203.0.113.7 192.0.2.1 4")
        self.assertIsNone(recorder.peerAtStart)
        wrapper.dataReceived(b"0000 25\r\nEHLO x\r\n")
        self.assertEqual(recorder.peerAtStart, IPv4Address("TCP", "203.0.113.7", 40000))
        self.assertEqual(recorder.received, b"EHLO x\r\n")

    def test_noHeaderInTime(self) -> None:
        clock = Clock()
        wrapper, recorder, transport = self.connect(clock)
        clock.advance(HEADER_TIMEOUT)
        self.assertTrue(transport.disconnected)
        wrapper.connectionLost(None)
        self.assertFalse(recorder.lost)  # never started, never told

    def test_notAHeader(self) -> None:
        wrapper, recorder, transport = self.connect(Clock())
        wrapper.dataReceived(b"EHLO client.example\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(recorder.peerAtStart)


class ProtocolDrainTests(SynchronousTestCase):
    """The session's side of a drain, on a StringTransport (mailrelay.testing's store)."""

    def setUp(self) -> None:
        self.harness = MemoryProtocolHarness(self)
        self.successResultOf(self.harness.start())
        self.registry = SessionRegistry(self.harness.clock)

    def connect(self) -> Any:
        session = self.harness.connect(sessions=self.registry)
        self.successResultOf(session.login())
        return session

    def test_idleSessionClosedWith421(self) -> None:
        session = self.connect()
        self.registry.drain(30)
        (line,) = session.take()
        self.assertTrue(line.startswith("421 4.3.2 "), line)
        self.assertTrue(session.transport.disconnecting)

    def test_dataFinishesThenClosed(self) -> None:
        session = self.connect()
        self.successResultOf(session.command(f"MAIL FROM:<app@{SENDER_DOMAIN}>"))
        self.successResultOf(session.command("RCPT TO:<someone@customer.example>"))
        self.assertTrue(self.successResultOf(session.command("DATA")).startswith("354"))
        session.protocol.dataReceived(f"From: app@{SENDER_DOMAIN}\r\nSubject: x\r\n\r\n".encode())
        done = self.registry.drain(30)
        self.assertEqual(session.take(), [])  # inside DATA: nothing said, nothing cut
        self.assertFalse(session.transport.disconnecting)
        session.protocol.dataReceived(b"Hello\r\n.\r\n")
        accepted, closing = session.take()
        self.assertRegex(accepted, ACCEPTED)
        self.assertTrue(closing.startswith("421 4.3.2 "), closing)
        self.assertTrue(session.transport.disconnecting)
        session.protocol.connectionLost(None)
        self.assertEqual(self.successResultOf(done), 0)

    def test_newConnectionWhileDraining(self) -> None:
        self.registry.drain(30)
        session = self.harness.connect(sessions=self.registry)
        self.assertTrue(session.greeting[-1].startswith("421 4.3.2 "), session.greeting)
