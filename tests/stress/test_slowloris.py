"""
Slowloris on SMTP and HTTP, and TLS handshakes that stall, against the whole relay running in
this process (real sockets, real TLS): the stalled connections are cut at their deadlines,
and meanwhile other clients are served and every message they got a 250 for is stored.
"""

from __future__ import annotations

import socket
import ssl
import time

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailrelay.web.channel import HEAD_DEADLINE
from tests.relay_fixture import (
    ACCOUNT,
    PASSWORD,
    SENDER,
    WireClient,
    startRelay,
)
from tests.stress.load import Submitters

HANDSHAKE = 2
LIMITS = f"""
[limits]
tls_handshake_timeout = {HANDSHAKE}
data_rate_grace = 2
data_min_rate = 2000
data_total_timeout = 6
max_connections = 120
max_connections_per_client = 120
"""
STALLERS = 100


def openStalled(port: int, count: int, send: bytes = b"") -> list[socket.socket]:
    """Blocking: ``count`` connections that send ``send`` and then nothing."""
    sockets = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if send:
            s.sendall(send)
        sockets.append(s)
    return sockets


def closedWithin(sockets: list[socket.socket], seconds: float) -> int:
    """Blocking: how many of ``sockets`` the server closed (EOF or reset) within ``seconds``."""
    deadline = time.monotonic() + seconds
    closed = 0
    for s in sockets:
        while True:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not s.recv(65536):
                    closed += 1
                    break
            except (ConnectionResetError, ssl.SSLError):
                closed += 1
                break
            except TimeoutError:
                break
        s.close()
    return closed


def clientHelloStart(serverName: str = "relay.test") -> bytes:
    """The first bytes of a real ClientHello (what a stalled handshake has sent)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=serverName)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()[:20]


class SMTPStallTests(TestCase):
    timeout = 120

    async def setUp(self) -> None:
        self.relay = await startRelay(self, extra=LIMITS)
        self.context = self.relay.files.clientContext()

    async def test_tlsStallsCutOthersServed(self) -> None:
        """100 sockets stall in the TLS handshake on the implicit-TLS port (half silent, half
        after a few bytes of ClientHello) and on the STARTTLS port after STARTTLS: all are
        aborted at tls_handshake_timeout, and a client that comes meanwhile is served."""
        tlsPort, starttlsPort = self.relay.ports["tls"], self.relay.ports["starttls"]
        hello = clientHelloStart()
        silent = await deferToThread(openStalled, tlsPort, STALLERS // 4)
        trickled = await deferToThread(openStalled, tlsPort, STALLERS // 4, hello)

        def startTLSStalled(count: int) -> list[socket.socket]:
            sockets = []
            for _ in range(count):
                client = WireClient(starttlsPort)
                client.reply()
                client.command("EHLO stall.test")
                assert client.command("STARTTLS").code == 220
                client.send(hello)
                sockets.append(client.sock)
            return sockets

        afterStartTLS = await deferToThread(startTLSStalled, STALLERS // 2)
        started = time.monotonic()
        load = Submitters(starttlsPort, self.context, count=2).start()
        await deferLater(reactor, 1.0, lambda: None)
        await deferToThread(load.stop)
        self.assertGreater(len(load.acked), 0, load.codes)
        closed = await deferToThread(closedWithin, silent + trickled + afterStartTLS, HANDSHAKE + 4)
        print(
            f"\nTLS stalls: {closed} of {STALLERS} cut within {time.monotonic() - started:.1f} s;"
            f" meanwhile {len(load.acked)} messages accepted"
        )
        self.assertEqual(closed, STALLERS)
        await self.assertStored(load.acked)

    async def test_dataDribblersCutOthersServed(self) -> None:
        """20 clients in DATA sending a byte a second are cut (421 4.4.2) once below the
        minimum rate; nothing of theirs is stored; other clients are served meanwhile."""

        def dribblers(count: int) -> list[WireClient]:
            clients = []
            for _ in range(count):
                client = WireClient(self.relay.ports["starttls"])
                client.reply()
                client.command("EHLO slow.test")
                client.command("STARTTLS")
                client.startTLS(self.context)
                client.command("EHLO slow.test")
                assert client.login(ACCOUNT, PASSWORD).code == 235
                client.command(f"MAIL FROM:<{SENDER}>")
                client.command("RCPT TO:<slow@example.org>")
                assert client.command("DATA").code == 354
                clients.append(client)
            return clients

        clients = await deferToThread(dribblers, 20)
        load = Submitters(self.relay.ports["starttls"], self.context, count=2).start()
        cut = 0
        started = time.monotonic()
        for _ in range(8):
            for client in clients:
                try:
                    client.send(b"x")
                except OSError:
                    pass
            await deferLater(reactor, 1.0, lambda: None)

        def replies() -> int:
            count = 0
            for client in clients:
                try:
                    client.sock.settimeout(2)
                    if client.reply().code == 421:
                        count += 1
                except (OSError, ConnectionError):
                    pass
                client.close()
            return count

        cut = await deferToThread(replies)
        await deferToThread(load.stop)
        print(
            f"\nDATA dribblers: {cut} of 20 cut with 421 within {time.monotonic() - started:.1f}"
            f" s; meanwhile {len(load.acked)} messages accepted"
        )
        self.assertEqual(cut, 20)
        self.assertGreater(len(load.acked), 0)
        await self.assertStored(load.acked)
        stats = await self.relay.store.stats()
        self.assertEqual(stats.queued, len(load.acked))  # none of the dribblers'

    async def assertStored(self, acked: list[str]) -> None:
        for notificationId in acked:
            notification = await self.relay.store.getNotification(notificationId)
            self.assertIsNotNone(notification, notificationId)


class HTTPSlowlorisTests(TestCase):
    timeout = 120

    async def test_dribbledHeadersCutStatusServed(self) -> None:
        """50 HTTP clients dribbling a header byte every second are closed at the head
        deadline (30 s) though each byte restarts the idle timer; /healthz answers meanwhile."""
        relay = await startRelay(self)
        port = relay.ports["web"]
        sockets = await deferToThread(openStalled, port, 50, b"GET /healthz HTTP/1.1\r\n")
        started = time.monotonic()
        served = 0
        while time.monotonic() - started < HEAD_DEADLINE + 3:
            for s in sockets:
                try:
                    s.send(b"X")
                except OSError:
                    pass
            served += await deferToThread(_healthz, port)
            await deferLater(reactor, 1.0, lambda: None)
        closed = await deferToThread(closedWithin, sockets, 2)
        print(f"\nHTTP slowloris: {closed} of 50 cut; {served} /healthz answered meanwhile")
        self.assertEqual(closed, 50)
        self.assertGreater(served, 0)


def _healthz(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return 1 if data.startswith(b"HTTP/1.1 ") else 0
