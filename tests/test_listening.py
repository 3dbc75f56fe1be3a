"""
Tests for mailrelay.listening and its use: the listen backlog every listener gets unless its
endpoint names one, the relay greeting a burst of hundreds of connections on its defaults, and
the kernel's listen queue drops on ``/metrics``.
"""

from __future__ import annotations

import errno
import os
import re
import selectors
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from mailrelay.listening import (
    NETSTAT_PATH,
    ListenQueueDrops,
    defaultBacklog,
    kernelBacklogLimit,
    listenQueueDrops,
    withBacklog,
)
from mailrelay.metrics import REGISTRY, ListenQueueCollector
from mailrelay.model import QueueStats
from mailrelay.web.health import Health
from tests.relay_fixture import Listener, startRelay

BURST = 400
"""Connections opened at once against a relay on its defaults: eight times Twisted's backlog."""


class WithBacklogTests(TestCase):
    def test_addedWhereNoneIsNamed(self) -> None:
        for endpoint in (
            "tcp:25",
            "tcp:0:interface=127.0.0.1",
            "tcp6:587:interface=\\:\\:1",
            "ssl:465:privateKey=key.pem",
            "unix:/run/mailrelay/smtp.sock",
            "haproxy:tcp:25:interface=10.0.0.1",
        ):
            self.assertEqual(withBacklog(endpoint, 4096), f"{endpoint}:backlog=4096")

    def test_usersBacklogWins(self) -> None:
        for endpoint in (
            "tcp:25:interface=127.0.0.1:backlog=50",
            "tcp:25:backlog=50:interface=127.0.0.1",
            "tcp:25:127.0.0.1:50",  # positional: PORT:INTERFACE:BACKLOG
            "tcp6:25:50",  # positional: PORT:BACKLOG
            "ssl:465:k.pem:c.pem:TLSv1_2_METHOD:0.0.0.0:50",
            "haproxy:tcp:25:backlog=50",
        ):
            self.assertEqual(withBacklog(endpoint, 4096), endpoint)

    def test_socketsBoundElsewhere(self) -> None:
        """systemd binds its sockets (with the unit's Backlog=); other endpoint types are
        left as they are."""
        for endpoint in ("systemd:domain=INET:name=smtp", "systemd:domain=INET:index=0", "stdio:"):
            self.assertEqual(withBacklog(endpoint, 4096), endpoint)

    def test_escapedColonIsNotASeparator(self) -> None:
        """An escaped colon is part of an argument, not a separator: the path counts as one
        positional argument, so no backlog is mistaken for one."""
        self.assertEqual(
            withBacklog("unix:/tmp/a\\:b:mode=600", 99), "unix:/tmp/a\\:b:mode=600:backlog=99"
        )


class KernelLimitTests(TestCase):
    def somaxconn(self, text: str) -> str:
        path = Path(self.mktemp())
        path.write_text(text)
        return str(path)

    def test_readsSomaxconn(self) -> None:
        self.assertEqual(kernelBacklogLimit(self.somaxconn("8192\n")), 8192)
        self.assertEqual(defaultBacklog(self.somaxconn("511\n")), 511)

    def test_fallback(self) -> None:
        """Unreadable or nonsense: Python's compile-time SOMAXCONN."""
        self.assertEqual(kernelBacklogLimit(self.mktemp()), socket.SOMAXCONN)
        self.assertEqual(kernelBacklogLimit(self.somaxconn("many")), socket.SOMAXCONN)
        self.assertEqual(kernelBacklogLimit(self.somaxconn("0")), socket.SOMAXCONN)

    def test_thisMachine(self) -> None:
        if not os.path.exists("/proc/sys/net/core/somaxconn"):
            raise SkipTest("no /proc/sys/net/core/somaxconn")
        with open("/proc/sys/net/core/somaxconn") as f:
            self.assertEqual(defaultBacklog(), int(f.read()))


NETSTAT = """\
TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops TCPHPHits
TcpExt: 0 0 243 251 17
IpExt: InNoRoutes InTruncatedPkts
IpExt: 0 0
"""


class ListenQueueDropsTests(TestCase):
    def netstat(self, text: str) -> str:
        path = Path(self.mktemp())
        path.write_text(text)
        return str(path)

    def test_parsed(self) -> None:
        self.assertEqual(listenQueueDrops(self.netstat(NETSTAT)), ListenQueueDrops(243, 251))

    def test_absent(self) -> None:
        self.assertIsNone(listenQueueDrops(self.mktemp()))
        self.assertIsNone(listenQueueDrops(self.netstat("IpExt: InNoRoutes\nIpExt: 0\n")))

    def test_collector(self) -> None:
        families = {f.name: f for f in ListenQueueCollector(self.netstat(NETSTAT)).collect()}
        self.assertEqual(families["mailrelay_tcp_listen_overflows"].type, "counter")
        self.assertEqual(families["mailrelay_tcp_listen_overflows"].samples[0].value, 243)
        self.assertEqual(families["mailrelay_tcp_listen_drops"].samples[0].value, 251)
        self.assertEqual(list(ListenQueueCollector(self.mktemp()).collect()), [])


class PingingStore:
    name = "sqlite"

    def ping(self) -> Any:
        return succeed(0.001)

    def stats(self) -> Any:
        return succeed(QueueStats(queued=0, deferred=0, in_flight=0))


class MetricsTests(TestCase):
    def test_overflowsOnMetrics(self) -> None:
        """/metrics shows the kernel's ListenOverflows and ListenDrops, read when scraped."""
        before = listenQueueDrops(NETSTAT_PATH)
        if before is None:
            raise SkipTest(f"no TcpExt counters in {NETSTAT_PATH}")
        health = Health(PingingStore(), Clock())  # type: ignore[arg-type]
        response = self.successResultOf(Deferred.fromCoroutine(health.metrics()))
        text = response.body.decode()
        self.assertIn("# TYPE mailrelay_tcp_listen_overflows_total counter", text)
        overflows = re.search(r"^mailrelay_tcp_listen_overflows_total (\S+)$", text, re.M)
        drops = re.search(r"^mailrelay_tcp_listen_drops_total (\S+)$", text, re.M)
        assert overflows is not None and drops is not None
        self.assertGreaterEqual(float(overflows.group(1)), before.overflows)  # never goes back
        self.assertGreaterEqual(float(drops.group(1)), before.drops)
        self.assertIn(b"mailrelay_tcp_listen_overflows_total", generate_latest(REGISTRY))


def openAtOnce(port: int, count: int, timeout: float) -> list[tuple[float, bytes]]:
    """
    Open ``count`` connections to 127.0.0.1:``port`` one right after the other (non-blocking
    connects, no waiting in between), then read each one's first line. For each: the seconds
    from its ``connect()`` to that line, and the line (``b""``: closed or reset without one;
    ``inf`` seconds: nothing within ``timeout``).
    """
    selector = selectors.DefaultSelector()
    started: dict[socket.socket, float] = {}
    received: dict[socket.socket, bytes] = {}
    results: list[tuple[float, bytes]] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            started[sock] = time.monotonic()
            error = sock.connect_ex(("127.0.0.1", port))
            if error not in (0, errno.EINPROGRESS):
                sock.close()
                raise OSError(error, os.strerror(error))
            received[sock] = b""
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                sock = key.fileobj  # type: ignore[assignment]
                try:
                    data = sock.recv(512)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                received[sock] += data
                if b"\r\n" in received[sock] or not data:
                    results.append((time.monotonic() - started[sock], received[sock]))
                    selector.unregister(sock)
        results += [(float("inf"), b"") for _ in selector.get_map()]
    finally:
        selector.close()
        for sock in started:
            sock.close()
    return results


def listenBacklog(port: int) -> int | None:
    """The backlog of the socket listening on 127.0.0.1:``port``, as ``ss`` shows it (its
    Send-Q column), or None without ``ss``."""
    if shutil.which("ss") is None:
        return None
    done = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=10, check=True
    )
    return int(done.stdout.split()[2])


class BurstTests(TestCase):
    """A relay started through mailrelay.tap on a default-style listener
    (``tcp:0:interface=127.0.0.1``, no ``backlog=``)."""

    async def test_everyConnectionGreetedWithinASecond(self) -> None:
        relay = await startRelay(self, [Listener("network", "none", auth="network")])
        results = await deferToThread(openAtOnce, relay.ports["network"], BURST, 10.0)
        self.assertEqual(len(results), BURST)
        lines = {line.split(b" ", 1)[0] for _, line in results}
        self.assertEqual(lines, {b"220"})
        slowest = max(wait for wait, _ in results)
        # A SYN the kernel drops for a full accept queue is sent again after 1 s.
        self.assertLess(slowest, 1.0, f"slowest greeting after {slowest:.3f} s")

    async def test_listenersHaveTheDefaultBacklog(self) -> None:
        """Both the SMTP and the web listener listen with the default backlog, and the
        endpoint the health check reports is the one the user wrote."""
        relay = await startRelay(self, [Listener("network", "none", auth="network")])
        for name in ("network", "web"):
            backlog = listenBacklog(relay.ports[name])
            if backlog is None:
                raise SkipTest("no ss to read a listening socket's backlog")
            self.assertEqual(backlog, defaultBacklog(), name)
