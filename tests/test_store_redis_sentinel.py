"""
The Redis store behind Redis Sentinel (``redis-sentinel://``): the URL, and a relay under load
while a real ``redis-sentinel`` promotes the replica of a real pair of ``redis-server``s, all
private processes on free loopback ports.

What a failover may cost: SMTP clients get 4xx while it lasts. What it must not: a 250 for a
message the new primary does not have. With ``?wait=1`` each 250 waits for the replica to
acknowledge the message, so a write the old primary took after the replica was promoted is
never acknowledged (the replica is gone: WAIT answers 0 and the client gets 451). Nor is any
message until the old primary is back as the new one's replica (Sentinel converts it about 8 s
after it sees it again): that is most of each failover test's time.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from mailrelay.interfaces import StoreError
from mailrelay.store.redis import RedisStore
from mailrelay.store.redis.client import RedisClient, ResponseError
from mailrelay.store.redis.url import RedisURL, parseRedisURL
from tests.relay_fixture import SENDER, Listener, WireClient, freePort, startRelay
from tests.test_integration import RECIPIENTS, acceptedId, wireMessage

HOST = "127.0.0.1"
SERVICE = "mymaster"
DOWN_AFTER_MS = 500
"""Sentinel's down-after-milliseconds: how soon a primary that stopped answering is down."""
FAILOVER_TIMEOUT_MS = 3000


def redisCommand(port: int, *args: str) -> list[str]:
    """``redis-cli``'s answer lines to one command (blocking)."""
    done = subprocess.run(
        ["redis-cli", "-h", HOST, "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=5,
        check=True,
    )
    return done.stdout.splitlines()


class SentinelCluster:
    """
    A primary, its replica and one sentinel watching them (quorum 1), each a child process.
    Blocking methods: call them from a thread, or at setup.
    """

    def __init__(self, testCase: TestCase) -> None:
        for program in ("redis-server", "redis-sentinel", "redis-cli"):
            if shutil.which(program) is None:
                raise SkipTest(f"{program} is not installed")
        self._testCase = testCase
        self.directory = Path(testCase.mktemp())
        self.directory.mkdir()
        self.primaryPort, self.replicaPort, self.sentinelPort = freePort(), freePort(), freePort()
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def url(self, options: str = "") -> str:
        return f"redis-sentinel://{HOST}:{self.sentinelPort}/{SERVICE}/0{options}"

    def start(self) -> None:
        self._server(self.primaryPort)
        self._server(self.replicaPort, "--replicaof", HOST, str(self.primaryPort))
        self._until(lambda: "master_link_status:up" in self.info(self.replicaPort))
        config = self.directory / "sentinel.conf"
        config.write_text(
            f"port {self.sentinelPort}\nbind {HOST}\n"
            f"sentinel monitor {SERVICE} {HOST} {self.primaryPort} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
        )
        self._spawn(self.sentinelPort, ["redis-sentinel", str(config)])
        self._until(
            lambda: (
                str(self.replicaPort)
                in redisCommand(self.sentinelPort, "SENTINEL", "REPLICAS", SERVICE)
            )
        )

    def _server(self, port: int, *arguments: str) -> None:
        command = ["redis-server", "--bind", HOST, "--port", str(port), "--save", ""]
        command += ["--dir", str(self.directory), "--dbfilename", f"{port}.rdb"]
        # A replica's full sync starts at once, not after the default 5 s of waiting for more.
        command += ["--repl-diskless-sync-delay", "0", *arguments]
        self._spawn(port, command)

    def _spawn(self, port: int, command: list[str]) -> None:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        self.processes[port] = process
        self._testCase.addCleanup(process.wait)
        self._testCase.addCleanup(lambda: process.poll() is None and process.kill())
        self._until(lambda: self._answers(port))

    @staticmethod
    def _answers(port: int) -> bool:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return True
        except OSError:
            return False

    @staticmethod
    def _until(condition: Any, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("the redis processes did not get ready in time")
            time.sleep(0.05)

    def info(self, port: int) -> str:
        return "\n".join(redisCommand(port, "INFO", "replication"))

    def primary(self) -> int:
        """The port of the primary the sentinel names now."""
        return int(
            redisCommand(self.sentinelPort, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)[1]
        )

    def failover(self) -> None:
        redisCommand(self.sentinelPort, "SENTINEL", "FAILOVER", SERVICE)

    def killPrimary(self) -> None:
        process = self.processes[self.primaryPort]
        process.send_signal(signal.SIGKILL)
        process.wait()

    def restartOldPrimary(self) -> None:
        """Start the killed primary again, empty: the sentinel makes it the new primary's
        replica."""
        self._server(self.primaryPort)

    def waitForPrimary(self, port: int, timeout: float = 15.0) -> None:
        """Until the sentinel names ``port`` primary and that server says it is one."""
        self._until(lambda: self.primary() == port and "role:master" in self.info(port), timeout)


@dataclass
class Load:
    """SMTP clients submitting in threads until told to stop; every DATA reply recorded."""

    port: int
    replies: list[tuple[float, int, str]] = field(default_factory=list)
    otherReplies: list[tuple[str, int]] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def run(self, clients: int) -> list[Any]:
        return [deferToThread(self._client, n) for n in range(clients)]

    def _client(self, number: int) -> None:
        while not self.stopping.is_set():
            try:
                with WireClient(self.port) as client:
                    self._session(client, number)
            except (OSError, ConnectionError):
                time.sleep(0.05)  # a 421 that closed the session: a new one

    def _session(self, client: WireClient, number: int) -> None:
        client.reply()
        client.command("EHLO load.test")
        sequence = 0
        while not self.stopping.is_set():
            sequence += 1
            mail = client.command(f"MAIL FROM:<{SENDER}>")
            if mail.code != 250:
                self.otherReplies.append(("MAIL", mail.code))
                client.command("RSET")
                time.sleep(0.05)
                continue
            rcpt = client.command(f"RCPT TO:<{RECIPIENTS[0]}>")
            if rcpt.code != 250:
                self.otherReplies.append(("RCPT", rcpt.code))
                client.command("RSET")
                time.sleep(0.05)
                continue
            if client.command("DATA").code != 354:
                client.command("RSET")
                continue
            client.send(wireMessage(f"load {number}/{sequence}"))
            reply = client.reply()
            self.replies.append((time.monotonic(), reply.code, reply.text))


class SentinelURLTests(TestCase):
    def test_parse(self) -> None:
        parsed = parseRedisURL(
            "redis-sentinel://app:s%40cret@s1.internal,s2.internal:26380,[::1]:26381"
            "/mymaster/3?wait=1&wait_timeout=250"
        )
        self.assertEqual(
            parsed,
            RedisURL(
                "",
                db=3,
                username="app",
                password="s@cret",
                wait=1,
                waitTimeoutMs=250,
                sentinels=(("s1.internal", 26379), ("s2.internal", 26380), ("::1", 26381)),
                service="mymaster",
            ),
        )
        self.assertEqual(
            parsed.address,
            "mymaster/3 via sentinels s1.internal:26379,s2.internal:26380,[::1]:26381",
        )
        self.assertNotIn("s@cret", repr(parsed))
        self.assertEqual(parseRedisURL("redis-sentinel://h/m").db, 0)

    def test_bad(self) -> None:
        for url in (
            "redis-sentinel://h1,h2",  # no service
            "redis-sentinel://h1/",
            "redis-sentinel://h1:x/m",
            "redis-sentinel://h1:99999/m",
            "redis-sentinel://h1,,h2/m",
            "redis-sentinel://[::1/m",
            "redis-sentinel://h1/m/zero",
            "redis-sentinel://h1/m/0?colour=blue",
        ):
            with self.assertRaises(ValueError, msg=url):
                parseRedisURL(url)

    async def test_noSentinelAnswers(self) -> None:
        """Opening fails with StoreError within the timeout when no sentinel answers."""
        url = f"redis-sentinel://{HOST}:{freePort()}/{SERVICE}/0"
        store = RedisStore(url, reactor, timeout=0.5)
        started = time.monotonic()
        with self.assertRaises(StoreError) as caught:
            await store.open()
        self.assertLess(time.monotonic() - started, 2)
        self.assertIn("via sentinels", str(caught.exception))
        await store.close()


class SentinelStoreTests(TestCase):
    """The store alone against a sentinel-watched pair."""

    async def test_unknownService(self) -> None:
        cluster = SentinelCluster(self)
        await deferToThread(cluster.start)
        url = f"redis-sentinel://{HOST}:{cluster.sentinelPort}/nosuch/0"
        store = RedisStore(url, reactor, timeout=0.5)
        with self.assertRaises(StoreError) as caught:
            await store.open()
        self.assertIn("no primary named 'nosuch'", str(caught.exception))
        await store.close()

    async def test_opensOnThePrimary(self) -> None:
        cluster = SentinelCluster(self)
        await deferToThread(cluster.start)
        store = RedisStore(cluster.url(), reactor, keyPrefix="t:", timeout=2)
        await store.open()
        self.addCleanup(store.close)
        await store.addAccount("acme", "h")
        primary = await RedisClient(
            parseRedisURL(f"redis://{HOST}:{cluster.primaryPort}/0"), 2, 1
        ).probe()
        self.addCleanup(primary.disconnect)
        self.assertEqual(await primary.execute_command("EXISTS", "t:account:acme"), 1)

    async def test_readOnlyReconnects(self) -> None:
        """A write refused with READONLY (a former primary that kept its clients) closes the
        pool's connections, which connect again through the sentinels; other errors do not."""
        cluster = SentinelCluster(self)
        await deferToThread(cluster.start)
        client = RedisClient(parseRedisURL(cluster.url()), 2.0, 1)
        client.start()
        self.addCleanup(client.stop)
        first = await client.command("CLIENT", "ID")
        client.noticeFailure(ResponseError("ERR unknown command"))
        self.assertEqual(await client.command("CLIENT", "ID"), first)
        client.noticeFailure(ResponseError("READONLY You can't write against a read only replica."))
        deadline = time.monotonic() + 5
        while True:
            try:
                second = await client.command("CLIENT", "ID")
                break
            except Exception:
                self.assertLess(time.monotonic(), deadline)
                await deferLater(reactor, 0.05)
        self.assertNotEqual(second, first)


class FailoverUnderLoadTests(TestCase):
    """A relay under SMTP load while the sentinel makes the replica the primary."""

    CLIENTS = 4
    LOAD_BEFORE = 1.0
    LOAD_AFTER = 1.5
    """Seconds of load before the failover, and after the relay's first 250 from the new
    primary."""

    async def runFailover(self, promote: str) -> None:
        cluster = SentinelCluster(self)
        await deferToThread(cluster.start)
        store = (
            f'[store]\nbackend = "redis"\nredis_url = "{cluster.url("?wait=1&wait_timeout=300")}"\n'
        )
        relay = await startRelay(self, [Listener("network", "none", auth="network")], store)
        await relay.updateAccount(networks=("127.0.0.0/8",))

        load = Load(relay.ports["network"])
        clients = load.run(self.CLIENTS)
        try:
            await deferLater(reactor, self.LOAD_BEFORE)
            switchStarted = time.monotonic()
            await deferToThread(cluster.failover if promote == "failover" else cluster.killPrimary)
            await deferToThread(cluster.waitForPrimary, cluster.replicaPort)
            if promote == "kill":
                # With wait=1 nothing is acknowledged until the new primary has a replica.
                await deferToThread(cluster.restartOldPrimary)
            switched = time.monotonic()
            deadline = switched + 30
            while not [r for r in load.replies if r[0] > switched and r[1] == 250]:
                self.assertLess(time.monotonic(), deadline, "no 250 after the failover")
                await deferLater(reactor, 0.1)
            resumed = time.monotonic()
            await deferLater(reactor, self.LOAD_AFTER)
        finally:
            load.stopping.set()
            for client in clients:
                await client

        codes = [code for _, code, _ in load.replies]
        self.assertEqual([c for c in codes if c != 250 and not 400 <= c < 500], [])
        self.assertEqual([r for r in load.otherReplies if not 400 <= r[1] < 500], [])
        before = [code for when, code, _ in load.replies if when < switchStarted]
        self.assertGreater(before.count(250), 0)
        during = [code for when, code, _ in load.replies if switchStarted <= when]
        self.assertGreater(len([c for c in during if c != 250]) + len(load.otherReplies), 0)

        accepted = [acceptedId(text) for _, code, text in load.replies if code == 250]
        newPrimary = await RedisClient(
            parseRedisURL(f"redis://{HOST}:{cluster.replicaPort}/0"), 5, 1
        ).probe()
        self.addCleanup(newPrimary.disconnect)
        missing = []
        for notificationId in accepted:
            stored = await newPrimary.execute_command(
                "EXISTS",
                f"mailrelay:notification:{notificationId}",
                f"mailrelay:body:{notificationId}",
            )
            if stored != 2:
                missing.append(notificationId)
        self.assertEqual(
            missing, [], f"acknowledged but not on the new primary ({len(accepted)} acknowledged)"
        )
        if os.environ.get("MAILRELAY_TEST_VERBOSE"):
            print(
                f"{promote}: primary switched in {switched - switchStarted:.1f} s, 250 again "
                f"after {resumed - switchStarted:.1f} s; {codes.count(250)} accepted, "
                f"{len(codes) - codes.count(250)} refused at DATA, "
                f"{len(load.otherReplies)} refused before"
            )

    async def test_sentinelFailover(self) -> None:
        """SENTINEL FAILOVER: the old primary lives on and becomes a replica."""
        await self.runFailover("failover")

    async def test_primaryKilled(self) -> None:
        """The primary is killed: the sentinel sees it down after DOWN_AFTER_MS and promotes
        the replica."""
        await self.runFailover("kill")
