"""
Several intake processes (``workers = N``): the configuration, the fair sharing of new
connections, and a real ``twistd mailrelay`` with a worker process serving real SMTP clients.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailrelay import metrics
from mailrelay.config import (
    AUTO_MAX_WORKERS,
    Config,
    ConfigError,
    parseConfig,
    withProcessCount,
)
from mailrelay.ids import INSTANCE_BITS, SEQUENCE_BITS
from mailrelay.metrics import REGISTRY, workerMetrics
from mailrelay.model import Account
from mailrelay.tap import ListenerService, Options, makeService
from mailrelay.workers.balance import (
    ABSENT,
    DELAY_PER_CONNECTION,
    MAX_ACCEPT_DELAY,
    LoadTable,
    balanceAccepts,
)
from mailrelay.workers.pool import (
    CHECK_INTERVAL,
    MAX_RESTART_DELAY,
    READY_TIMEOUT,
    SETUP_FD,
    SILENCE_TIMEOUT,
    STABLE_AFTER,
    STOP_TIMEOUT,
    WorkerPool,
    WorkerSetup,
)
from tests.relay_fixture import (
    ACCOUNT,
    CLIENT_TIMEOUT,
    PASSWORD,
    SENDER,
    Listener,
    RelayFiles,
    RelayProcess,
    addAccountByIP,
    freePort,
)

ACCEPTED = re.compile(rb"2\.0\.0 OK id=(\d+)")


def instanceOf(notificationId: str) -> int:
    """The instance number inside a notification id: which relay process made it."""
    return (int(notificationId) >> SEQUENCE_BITS) & ((1 << INSTANCE_BITS) - 1)


class WorkersConfigTests(SynchronousTestCase):
    def test_defaultIsOnePerCore(self) -> None:
        """``workers`` left out (or ``"auto"``) is decided at start: one process per core, at
        most AUTO_MAX_WORKERS; a number in the file is kept as it is."""
        self.assertEqual(parseConfig({}).workers, 0)
        self.assertEqual(parseConfig({"workers": "auto"}).workers, 0)
        self.assertEqual(Config().workers, 0)
        self.assertEqual(Config().processCount, 1)  # undecided: what the admin command sees
        decided = [withProcessCount(parseConfig({}), cores).workers for cores in (1, 2, 4, 64)]
        self.assertEqual(decided, [1, 2, 4, AUTO_MAX_WORKERS])
        self.assertEqual(withProcessCount(parseConfig({"workers": 3}), 2).workers, 3)
        self.assertEqual(withProcessCount(parseConfig({}), None).workers, os.cpu_count() or 1)

    def test_autoWithListenersThatCannotBeShared(self) -> None:
        """A listener other processes cannot take over makes ``auto`` one process (where a
        number above 1 is refused), and so does an SMPP gateway (one bind per account is
        common); the instance numbers left bound it too."""
        table = {"listeners": [{"endpoint": "tcp:587"}, {"endpoint": "unix:/run/m.sock"}]}
        self.assertEqual(withProcessCount(parseConfig(table), 8).workers, 1)
        smpp = {"sms": {"domains": ["sms.example"], "gateway": "smpp://u:p@127.0.0.1:2775"}}
        self.assertEqual(withProcessCount(parseConfig(smpp), 8).workers, 1)
        https = {"sms": {"domains": ["sms.example"], "gateway": "https://gw.example/send"}}
        self.assertEqual(withProcessCount(parseConfig(https), 8).workers, 8)
        withInstance = {"store": {"instance_id": 1022}}
        self.assertEqual(withProcessCount(parseConfig(withInstance), 8).workers, 2)

    def test_bounds(self) -> None:
        for bad in (-1, 65, "many"):
            with self.assertRaises(ConfigError) as caught:
                parseConfig({"workers": bad})
            self.assertIn("workers", str(caught.exception))
        self.assertEqual(parseConfig({"workers": 64}).workers, 64)

    def test_listenerKinds(self) -> None:
        """A worker takes over a listening socket as it is: the TLS of ssl: would be lost,
        and a worker stopping would delete a UNIX socket's file, so with workers only TCP
        listeners are taken, also inside haproxy: (a worker reads the PROXY header itself);
        the others are refused, naming the key."""
        refused = (
            "haproxy:unix:/run/mailrelay.sock",
            "ssl:465:privateKey=k.pem",
            "unix:/run/mailrelay.sock",
            "systemd:domain=UNIX:index=0",
        )
        for endpoint in refused:
            table = {"workers": 2, "listeners": [{"endpoint": "tcp:587"}, {"endpoint": endpoint}]}
            with self.assertRaises(ConfigError) as caught:
                parseConfig(table)
            self.assertIn("listeners[1].endpoint", str(caught.exception))
        taken = (
            "tcp:25",
            "tcp6:25",
            "systemd:domain=INET:index=0",
            "systemd:domain=INET6:index=1",
            "haproxy:tcp:25",
            "haproxy:systemd:domain=INET:index=0",
        )
        for endpoint in taken:
            parseConfig({"workers": 2, "listeners": [{"endpoint": endpoint}]})
        parseConfig({"workers": 1, "listeners": [{"endpoint": "haproxy:tcp:25"}]})

    def test_instanceNumbers(self) -> None:
        """Each process makes ids with instance_id + its index, which must stay <= 1023."""
        parseConfig({"workers": 4, "store": {"instance_id": 1020}})
        with self.assertRaises(ConfigError) as caught:
            parseConfig({"workers": 5, "store": {"instance_id": 1020}})
        self.assertIn("store.instance_id", str(caught.exception))
        # Redis with instance_id 0 leases a free number per process: no range to check.
        parseConfig({"workers": 64, "store": {"backend": "redis", "instance_id": 0}})

    def test_share(self) -> None:
        shares = [Config(workers=n).perProcess(10) for n in (1, 2, 3, 4, 64)]
        self.assertEqual(shares, [10, 5, 3, 2, 1])

    def test_sharesApplied(self) -> None:
        """The main process (and so each worker) allows its share of the in-memory limits."""
        directory = Path(self.mktemp())
        directory.mkdir()
        path = directory / "mailrelay.toml"
        path.write_text(
            f'workers = 4\ndata_dir = "{directory / "data"}"\n'
            '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\nsecurity = "none"\n'
            '[web]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
            "[limits]\nmax_connections = 100\nmax_connections_per_client = 10\n"
        )
        options = Options()
        options.parseOptions(["--config", str(path)])
        root = makeService(options, reactor)
        listener = next(s for s in root if isinstance(s, ListenerService))
        settings = listener.factory.settings
        self.assertEqual(
            (settings.connections.maxTotal, settings.connections.maxPerClient), (25, 2)
        )
        self.assertEqual(settings.throttle._maxFailures, 2)  # 10 failed logins / 4
        limited = Account("acme", "hash", rate_per_second=8)
        allowed = [settings.portal.realm._makeAvatar.rateLimiter.allow(limited) for _ in range(4)]
        self.assertEqual(allowed, [True, True, False, False])  # a burst of 8 / 4


def _sample(name: str, labels: dict[str, str]) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


class WorkerMetricsTests(SynchronousTestCase):
    """/metrics adds the workers' snapshots to the main process's own counters."""

    def setUp(self) -> None:
        self.addCleanup(setattr, workerMetrics, "workers", {})
        self.addCleanup(setattr, workerMetrics, "retired", {})
        self.label = {"listener": f"test-{id(self)}"}
        metrics.connections.labels(**self.label).inc(3)

    def test_sum(self) -> None:
        name = "mailrelay_connections_total"
        self.assertEqual(_sample(name, self.label), 3)
        snapshot = metrics.snapshot()
        self.assertNotIn("_created", json.dumps(snapshot))  # times are not added up
        workerMetrics.workers[1] = json.loads(json.dumps(snapshot))  # as sent over the pipe
        workerMetrics.workers[2] = {name.removesuffix("_total"): [[name, self.label, 4.0]]}
        self.assertEqual(_sample(name, self.label), 3 + 3 + 4)

    def test_endedWorkerCountersKept(self) -> None:
        """A worker that ended keeps counting in the totals (counters never go backwards);
        its gauges (open sessions) are gone with it."""
        counter, gauge = "mailrelay_connections", "mailrelay_sessions_active"
        for _ in range(2):  # it ends twice: both lives count
            workerMetrics.workers[1] = {
                counter: [[f"{counter}_total", self.label, 5.0]],
                gauge: [[gauge, self.label, 2.0]],
            }
            workerMetrics.retire(1)
        self.assertEqual(_sample(f"{counter}_total", self.label), 3 + 5 + 5)
        self.assertIn(_sample(gauge, self.label), (None, 0.0))


class LoadTableTests(SynchronousTestCase):
    def test_leastOfTheServing(self) -> None:
        table = LoadTable.create(3)
        self.addCleanup(os.close, table.fd)
        self.assertEqual(table.least(), 0)  # nobody serves yet
        table.set(0, 5)
        table.set(2, 2)
        self.assertEqual(table.least(), 2)
        table.set(2, ABSENT)  # ended: its count no longer counts
        self.assertEqual(table.least(), 5)

    def test_sharedThroughTheDescriptor(self) -> None:
        """A worker maps the same memory from the inherited descriptor."""
        table = LoadTable.create(2)
        self.addCleanup(os.close, table.fd)
        other = LoadTable(table.fd, 2)
        other.set(1, 7)
        self.assertEqual(table.get(1), 7)


class _Port:
    """The parts of a listening tcp.Port that balanceAccepts uses; ``pending`` is the
    accept queue it shares with the other processes' ports."""

    numberAccepts = 100
    connected = True

    def __init__(self, pending: list[int], loads: LoadTable, index: int) -> None:
        self.pending = pending
        self.loads = loads
        self.index = index
        self.reading = True
        self.accepted = 0
        self.numberAcceptsSeen: list[int] = []
        loads.set(index, 0)

    def doRead(self) -> None:
        self.numberAcceptsSeen.append(self.numberAccepts)
        if self.pending[0]:
            self.pending[0] -= 1
            self.accepted += 1
            self.loads.set(self.index, self.accepted)

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class BalanceAcceptsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.loads = LoadTable.create(2)
        self.addCleanup(os.close, self.loads.fd)
        self.pending = [0]
        self.ports = [_Port(self.pending, self.loads, i) for i in range(2)]
        for port in self.ports:
            balanceAccepts(port, self.clock, lambda port=port: port.accepted, self.loads.least)

    def wakeAll(self, rounds: int) -> None:
        """The kernel wakes every reading process while connections wait, the first port
        always first (as epoll does with its most recent waiter)."""
        for _ in range(rounds):
            for port in self.ports:
                if port.reading and self.pending[0]:
                    port.doRead()
            self.clock.advance(DELAY_PER_CONNECTION / 4)

    def test_oneConnectionPerWakeUp(self) -> None:
        self.pending[0] = 3
        self.ports[0].doRead()
        self.assertEqual((self.ports[0].accepted, self.pending[0]), (1, 2))
        self.assertEqual(self.ports[0].numberAcceptsSeen, [1])

    def test_burstIsShared(self) -> None:
        """Ten clients at once (a load generator's persistent sessions): five each."""
        self.pending[0] = 10
        self.wakeAll(200)
        self.assertEqual([port.accepted for port in self.ports], [5, 5])

    def test_busyProcessWaitsItsTurn(self) -> None:
        """A process serving 30 more connections than the least busy one waits 30 x the
        delay, then takes one connection (if the other has not taken it meanwhile)."""
        busy = self.ports[0]
        busy.accepted = 30
        self.loads.set(0, 30)
        self.ports[1].reading = False  # the other process is busy elsewhere
        self.pending[0] = 1
        busy.doRead()
        self.assertEqual(busy.accepted, 30)
        self.assertFalse(busy.reading)
        self.clock.advance(30 * DELAY_PER_CONNECTION * 0.9)
        self.assertEqual(busy.accepted, 30)
        self.clock.advance(30 * DELAY_PER_CONNECTION * 0.2)
        self.assertTrue(busy.reading)
        self.assertEqual(busy.accepted, 31)  # taken as soon as its turn came

    def test_sparseArrivalsGoToTheLeastBusy(self) -> None:
        """One client every 50 ms, the busy process woken first each time: the idle one gets
        every connection until the two serve as many."""
        self.ports[0].accepted = 40
        self.loads.set(0, 40)
        for _ in range(60):
            self.pending[0] = 1
            self.wakeAll(400)
            self.clock.advance(0.05)
        self.assertEqual(self.ports[0].accepted, 40 + 10)
        self.assertEqual(self.ports[1].accepted, 50)

    def test_delayIsBounded(self) -> None:
        port = self.ports[0]
        port.accepted = 1_000_000
        self.loads.set(0, port.accepted)
        self.pending[0] = 1
        port.doRead()
        self.clock.advance(MAX_ACCEPT_DELAY)
        self.assertTrue(port.reading)

    def test_stoppedListeningMeanwhile(self) -> None:
        port = self.ports[0]
        port.accepted = 5
        self.loads.set(0, 5)
        self.pending[0] = 1
        port.doRead()
        port.connected = False
        self.clock.advance(1)
        self.assertFalse(port.reading)
        self.assertEqual(port.accepted, 5)


class WorkerProcessTests(TestCase):
    """``twistd -n mailrelay`` with ``workers = 2``: the main process and one worker."""

    timeout = 60

    async def startRelay(self) -> tuple[RelayFiles, RelayProcess, int]:
        port = freePort()
        # Relay by IP: the test account submits from 127.0.0.1 without AUTH.
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        self.webPort = freePort()
        files = RelayFiles(
            Path(self.mktemp()),
            [Listener("network", "none", "network", endpoint)],
            webEndpoint=f"tcp:{self.webPort}:interface=127.0.0.1",
            workers=2,
        )
        await addAccountByIP(files)
        relay = RelayProcess(files, "workers")
        await deferToThread(relay.start)
        self.addCleanup(self.killAll, relay)
        await deferToThread(relay.waitUntilServing, port)
        await deferToThread(self.waitForLog, relay, "worker 1 serving")
        return files, relay, port

    def killAll(self, relay: RelayProcess) -> Any:
        pids = self.workerPids(relay)

        def kill() -> None:
            relay.signal(signal.SIGKILL)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

        return deferToThread(kill)

    async def health(self, files: RelayFiles) -> Any:
        """The ``workers`` part of the relay's /healthz document."""

        def get() -> Any:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.webPort}/healthz") as response:
                return json.load(response)["workers"]

        return await deferToThread(get)

    @staticmethod
    def workerPids(relay: RelayProcess) -> list[int]:
        return [int(pid) for pid in re.findall(r"worker 1 started \(pid (\d+)\)", relay.log())]

    @staticmethod
    def waitForLog(relay: RelayProcess, text: str, count: int = 1, timeout: float = 30) -> None:
        relay.waitForLog(text, count, timeout)

    @staticmethod
    def submitAll(port: int, sessions: int, messages: int) -> list[str]:
        """Blocking: ``sessions`` SMTP sessions open at once, each sending ``messages``
        messages with smtplib; every notification id, in no particular order."""

        def connect() -> smtplib.SMTP:
            smtp = smtplib.SMTP(
                "127.0.0.1", port, local_hostname="client.test", timeout=CLIENT_TIMEOUT
            )
            smtp.ehlo()
            return smtp

        with ThreadPoolExecutor(sessions) as pool:
            clients = list(pool.map(lambda _: connect(), range(sessions)))

            def send(smtp: smtplib.SMTP) -> list[str]:
                ids = []
                for n in range(messages):
                    assert smtp.mail(SENDER)[0] == 250
                    assert smtp.rcpt("someone@customer.example")[0] == 250
                    message = f"From: {SENDER}\r\nSubject: {n}\r\n\r\nHello\r\n"
                    code, text = smtp.data(message.encode())
                    match = ACCEPTED.search(text)
                    assert code == 250 and match, (code, text)
                    ids.append(match.group(1).decode())
                smtp.quit()
                return ids

            return [i for ids in pool.map(send, clients) for i in ids]

    async def test_bothProcessesServeAndStoreDurably(self) -> None:
        files, relay, port = await self.startRelay()
        ids = await deferToThread(self.submitAll, port, 12, 5)
        self.assertEqual(len(set(ids)), 60)
        # Both processes took sessions (the main one makes instance 0, the worker 1).
        self.assertEqual({instanceOf(i) for i in ids}, {0, 1}, relay.log())
        # Every message that got its 250 is on disk, in the file of the process that took it:
        # the main file for instance 0, the worker's own file for instance 1.
        stored: dict[int, set[str]] = {}
        for instance, name in ((0, "mailrelay.sqlite3"), (1, "mailrelay.worker-1.sqlite3")):
            database = sqlite3.connect(files.dataDir / name)
            self.addCleanup(database.close)
            rows = database.execute(
                "SELECT id FROM notifications JOIN queue ON notification_id = id "
                "WHERE state = 'queued'"
            )
            stored[instance] = {str(row[0]) for row in rows}
        self.assertEqual(stored[0] | stored[1], set(ids))
        self.assertEqual(stored[1], {i for i in ids if instanceOf(i) == 1})
        # The status API (the main process) reads them all.
        for notificationId in ids[::7]:
            document = (await self.statusOf(files, notificationId))["SAPnotification"]
            self.assertEqual(document["notificationId"], notificationId)
            (received,) = document["status"]
            self.assertEqual(received["statusCode"], "CAAS_RECEIVED")
        # /metrics adds up both processes (a worker reports about once a second).
        deadline = time.monotonic() + 10
        while (counted := await self.acceptedCount()) < 60 and time.monotonic() < deadline:
            await deferToThread(time.sleep, 0.2)
        self.assertEqual(counted, 60)
        # Each process, once serving, kept what it made to start out of the collector's runs.
        kept = "objects of the start kept out of garbage collection"
        await deferToThread(self.waitForLog, relay, kept, 2)

    async def statusOf(self, files: RelayFiles, notificationId: str) -> Any:
        """The status API's document for one notification (as the account, with its
        password)."""

        def get() -> Any:
            url = f"http://127.0.0.1:{self.webPort}/{ACCOUNT}/notifications/id/{notificationId}"
            login = base64.b64encode(f"{ACCOUNT}:{PASSWORD}".encode()).decode()
            request = urllib.request.Request(url, headers={"Authorization": f"Basic {login}"})
            with urllib.request.urlopen(request) as response:
                return json.load(response)

        return await deferToThread(get)

    async def acceptedCount(self) -> float:
        """mailrelay_messages_total{code="250"} from the relay's /metrics."""

        def get() -> float:
            url = f"http://127.0.0.1:{self.webPort}/metrics"
            with urllib.request.urlopen(url) as response:
                text = response.read().decode()
            match = re.search(r'^mailrelay_messages_total\{code="250"\} (\S+)$', text, re.M)
            return float(match.group(1)) if match else 0.0

        return await deferToThread(get)

    async def test_workerRestartedWhenItDies(self) -> None:
        """A worker killed is started again, with the configuration the relay started with:
        the file on disk, changed meanwhile (here: unusable), is not read again."""
        files, relay, port = await self.startRelay()
        self.assertEqual(await self.health(files), {"configured": 2, "serving": 2})
        files.configPath.write_text("workers = 2\n[[listeners]]\nendpoint = 'ssl:1'\n")
        (first,) = self.workerPids(relay)
        os.kill(first, signal.SIGKILL)
        await deferToThread(self.waitForLog, relay, f"worker 1 (pid {first}) ended")
        self.assertEqual(await self.health(files), {"configured": 2, "serving": 1})
        await deferToThread(self.waitForLog, relay, "worker 1 serving", 2)
        self.assertEqual(await self.health(files), {"configured": 2, "serving": 2})
        self.assertIn(f"worker 1 (pid {first}) ended", relay.log())
        pids = self.workerPids(relay)
        self.assertEqual(len(pids), 2)
        self.assertNotEqual(pids[1], first)
        ids = await deferToThread(self.submitAll, port, 8, 3)
        self.assertEqual(len(set(ids)), 24)

    async def test_stopStopsTheWorkers(self) -> None:
        _, relay, port = await self.startRelay()
        (worker,) = self.workerPids(relay)
        status = await deferToThread(relay.signal, signal.SIGTERM, 30)
        self.assertIn(status, (0, -signal.SIGTERM), relay.log())
        self.assertFalse(_running(worker), "the worker outlived the relay")
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()

    async def test_workerStopsWhenTheMainProcessDies(self) -> None:
        """kill -9 of the main process: the worker sees its stdin close and exits."""
        _, relay, _ = await self.startRelay()
        (worker,) = self.workerPids(relay)
        await deferToThread(relay.signal, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while _running(worker) and time.monotonic() < deadline:
            await deferToThread(time.sleep, 0.1)
        self.assertFalse(_running(worker), "the worker outlived the killed relay")


class WorkerStartTests(TestCase):
    async def test_unusableSocketEndsTheWorker(self) -> None:
        """A worker that cannot take over its socket exits 1 saying why (and the pool starts
        it again), instead of running without serving."""
        files = RelayFiles(Path(self.mktemp()), [Listener("plain", "none")])
        store = files.makeStore()  # the main process made the database before its workers
        await store.open()
        await store.close()
        notASocket = os.open(os.devnull, os.O_RDONLY)
        self.addCleanup(os.close, notASocket)
        loads = LoadTable.create(1)
        self.addCleanup(os.close, loads.fd)
        setupRead, setupWrite = os.pipe()
        self.addCleanup(os.close, setupRead)
        with os.fdopen(setupWrite, "wb") as pipe:
            pipe.write(WorkerSetup(files.configPath.read_text(), None).encode())
        command = [
            sys.executable,
            "-m",
            "mailrelay.workers.child",
            "--index",
            "1",
            "--setup-fd",
            str(setupRead),
            "--load-fd",
            str(loads.fd),
            "--listener",
            f"0:{notASocket}:{int(socket.AF_INET)}",
        ]

        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                command,
                env=RelayProcess.environment(),
                pass_fds=[notASocket, setupRead, loads.fd],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60,
            )

        result = await deferToThread(run)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("mailrelay: worker 1 cannot serve", result.stderr)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


class _FakeProcessTransport:
    """What WorkerPool does with a spawned worker's transport, recorded."""

    def __init__(self, protocol: Any, pid: int) -> None:
        self.protocol = protocol
        self.pid = pid
        self.written: list[tuple[int, bytes]] = []
        self.closed: list[int] = []
        self.signals: list[str] = []

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.written.append((fd, data))

    def closeChildFD(self, fd: int) -> None:
        self.closed.append(fd)

    def signalProcess(self, signal: str) -> None:
        self.signals.append(signal)


class _ProcessClock(Clock):
    """A task.Clock that 'spawns' processes by recording them (no process runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[_FakeProcessTransport] = []
        self.refuse = False

    def spawnProcess(self, protocol: Any, executable: str, args: Any, **kwargs: Any) -> Any:
        if self.refuse:
            raise OSError("no more processes")
        transport = _FakeProcessTransport(protocol, 1000 + len(self.spawned))
        self.spawned.append(transport)
        protocol.makeConnection(transport)
        return transport


class _BoundPort:
    def __init__(self) -> None:
        self.socket = socket.socket()
        self.numberAccepts = 100
        self.connected = True

    def fileno(self) -> int:
        return self.socket.fileno()

    def doRead(self) -> None:
        pass


class _Listener:
    description = "tcp:0"

    def __init__(self) -> None:
        self.port = _BoundPort()


class WorkerPoolTests(SynchronousTestCase):
    """The pool's own decisions, on a fake reactor: restart delays, the silence check, the
    stop timeout."""

    def setUp(self) -> None:
        self.clock = _ProcessClock()
        self.loads = LoadTable.create(2)
        self.addCleanup(os.close, self.loads.fd)
        listener = _Listener()
        self.addCleanup(listener.port.socket.close)
        self.pool = WorkerPool(
            self.clock,
            count=1,
            setup=WorkerSetup("workers = 2\n", None),
            listeners=[listener],
            loads=self.loads,
            openConnections=lambda: 0,
        )
        self.pool.startService()

    def worker(self) -> Any:
        return self.clock.spawned[-1].protocol

    def end(self, worker: Any) -> None:
        worker.processEnded(Failure(ProcessTerminated(signal=9)))

    def test_setupSentThenPipeClosed(self) -> None:
        (transport,) = self.clock.spawned
        self.assertEqual(
            transport.written, [(SETUP_FD, WorkerSetup("workers = 2\n", None).encode())]
        )
        self.assertEqual(transport.closed, [SETUP_FD])

    def test_restartDelayDoublesWhileItKeepsEnding(self) -> None:
        delays = []
        for _ in range(4):
            started = len(self.clock.spawned)
            self.end(self.worker())
            waited = 0.0
            while len(self.clock.spawned) == started:
                self.clock.advance(0.5)
                waited += 0.5
            delays.append(waited)
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0])
        # after a long stable run, back to the first delay
        self.worker().outReceived(b"ready\n")
        self.clock.advance(STABLE_AFTER + 1)
        started = len(self.clock.spawned)
        self.end(self.worker())
        self.clock.advance(1.0)
        self.assertEqual(len(self.clock.spawned), started + 1)

    def test_endedWorkerLeavesTheLoadTable(self) -> None:
        self.loads.set(1, 7)
        self.end(self.worker())
        self.assertEqual(self.loads.get(1), ABSENT)

    def test_silentWorkerKilled(self) -> None:
        worker = self.worker()
        worker.outReceived(b"ready\n")
        self.assertEqual(self.pool.serving(), (2, 2))
        for _ in range(3):  # it reports every second
            self.clock.advance(1)
            worker.outReceived(b"metrics {}\n")
        self.clock.advance(CHECK_INTERVAL)
        self.assertEqual(self.clock.spawned[-1].signals, [])
        self.clock.advance(SILENCE_TIMEOUT + CHECK_INTERVAL)
        self.assertEqual(self.clock.spawned[-1].signals, ["KILL"])

    def test_workerNeverReadyKilled(self) -> None:
        self.clock.advance(READY_TIMEOUT + CHECK_INTERVAL)
        self.assertEqual(self.clock.spawned[-1].signals, ["KILL"])

    def test_spawnFailureRetried(self) -> None:
        self.end(self.worker())
        self.clock.refuse = True
        self.clock.advance(1.0)  # the restart fails...
        self.assertEqual(len(self.clock.spawned), 1)
        self.clock.refuse = False
        self.clock.advance(MAX_RESTART_DELAY)  # ...and is tried again
        self.assertEqual(len(self.clock.spawned), 2)

    def test_stopWaitsThenKills(self) -> None:
        worker = self.worker()
        stopped = self.pool.stopService()
        self.assertEqual(self.clock.spawned[-1].signals, ["TERM"])
        self.clock.advance(STOP_TIMEOUT)
        self.assertEqual(self.clock.spawned[-1].signals, ["TERM", "KILL"])
        self.assertNoResult(stopped)
        self.end(worker)
        self.successResultOf(stopped)
        self.clock.advance(MAX_RESTART_DELAY)
        self.assertEqual(len(self.clock.spawned), 1)  # not restarted after the stop
