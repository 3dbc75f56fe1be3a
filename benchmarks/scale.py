"""
Scale (issue 21): with a million messages queued, claiming due work stays under 5 ms p99 and
the relay's RSS under 300 MB; the status API answers an id in under 5 ms p99 at 200 requests/s.

    python -m benchmarks.scale --queued 1000000 --duration 60
    python -m benchmarks.scale --queued 20000 --duration 10 --keep /tmp/scale   # a small look

What it does, in order:

1. a fresh data directory (a temporary one, or ``--keep DIR``) with the account ``bench`` set
   up by the admin command line as the end-to-end benchmark does it (sender domain
   ``bench.example``, networks 127.0.0.0/8), then ``--queued`` notifications of 2 KiB to one
   recipient enqueued in this process through the real store (:func:`mailrelay.store.makeStore`
   on the relay's own config: an :class:`~mailrelay.store.sqlite.SQLiteStore`), with the bytes
   the intake stores (its ``Received:`` field on top of the message) and the recipient its
   RCPT classification makes. Many enqueues wait at once so that the writer's group commit
   batches them as it batches a busy intake's. Once the fill is on disk (``os.sync()``),
   200 claims of 50 are timed on the full queue with nothing else running;
2. the relay as a user runs it, ``twistd -n --pidfile= mailrelay --config FILE``, on its
   default config but ``[delivery] mode = "smarthost"`` to Postfix's ``smtp-sink`` on a
   loopback port: it claims and delivers from the backlog during the measurement;
3. for ``--duration`` seconds: the relay's RSS every second (the main process, and the sum of
   all its processes), and ``GET /bench/notifications/id/{id}`` on random queued ids at a
   fixed open-loop rate (``--rate``) over a few keep-alive connections. A request's latency
   runs from the moment it was scheduled, so a request that waits for a busy connection counts
   its wait; every answer must be a 200 carrying the notification's trail;
4. the relay's ``/metrics`` before and after the window: the histogram
   ``mailrelay_delivery_claim_seconds`` (summed over the relay's processes) over the window
   gives the claims' count, mean and p50/p99 (as the bucket bound where the cumulative count
   reaches 50 % / 99 %), and the sink's counter the messages delivered in it.

The markdown section goes to stdout and to ``--markdown`` (``/tmp/scale_results.md``), never to
benchmarks/RESULTS.md; ``--json FILE`` also writes the figures as JSON (the smoke test's way in).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, gatherResults
from twisted.python.failure import Failure

from benchmarks import adapters
from benchmarks.adapters import (
    _spawn,
    _terminate,
    free_port,
    wait_for_log_lines,
    wait_until_serving,
)
from benchmarks.certs import make_cert
from benchmarks.e2e import MAILRELAY_DELIVERY, SENDER_DOMAIN, SINK, Sink
from benchmarks.messages import SENDER, message_body
from benchmarks.procstat import descendants, machine_busy_seconds, rss_kib, tree_cpu_seconds
from benchmarks.report import machine
from benchmarks.status_bench import Target, readResponse, requestBytes
from mailrelay.config import loadConfig, webInOwnProcess, withProcessCount
from mailrelay.message.received import receivedHeader
from mailrelay.model import Notification, fromTimestamp
from mailrelay.policy.recipients import classifyRecipient
from mailrelay.store import makeStore
from mailrelay.store.sqlite import SQLiteStore

DEFAULT_MARKDOWN = Path("/tmp/scale_results.md")
MESSAGE_SIZE = 2048
RECIPIENT = "user0@example.com"  # what e2e's smtp-source sends to
CLIENT_HELO = "loadgen.bench.local"
ENQUEUES_IN_FLIGHT = 4096
"""Enqueues waiting for the store at once during the fill: several of the writer's commit
groups (256 each), so that it always finds a full group waiting when it finishes one."""
ENQUEUE_GROUP = 256
STATUS_CONNECTIONS = 4
STATUS_WARMUP = 5  # requests per connection before the window: connect, and the login cached
STATUS_TIMEOUT = 10.0  # seconds an answer may take before it counts as an error
CLAIM_METRIC = "mailrelay_delivery_claim_seconds"
DELIVERED_METRIC = "mailrelay_deliveries_total"
TARGET_CLAIM_P99_S = 0.005
TARGET_RSS_BYTES = 300 * 1000 * 1000  # "300 MB": decimal megabytes, the stricter reading
TARGET_STATUS_P99_S = 0.005
FILL_WARNING_S = 300.0


# -- 1. the fill --


@dataclass
class FillResult:
    """What the fill queued, and how fast."""

    queued: int  # the store's count of queued entries once the fill was done
    seconds: float
    commits: int  # write transactions the fill took: the messages per commit show the batching
    ids: array[int] = field(repr=False)  # every notification enqueued, as stored (ints)
    claimAlone_s: list[float] = field(default_factory=list, repr=False)  # see timeClaims

    @property
    def rate(self) -> float:
        return len(self.ids) / self.seconds if self.seconds > 0 else 0.0


async def fillQueue(
    store: SQLiteStore,
    account: str,
    count: int,
    clock: Any,
    hostname: str,
    inFlight: int = ENQUEUES_IN_FLIGHT,
) -> FillResult:
    """
    Enqueue ``count`` 2 KiB notifications of ``account`` into the opened ``store`` through its
    :meth:`~mailrelay.interfaces.IStore.enqueue`, up to ``inFlight`` waiting at once, each as
    the intake of the relay named ``hostname`` would have stored it at ``clock``'s now.
    Returns the store's queued count afterwards, the time taken and the ids.
    """
    owner = await store.getAccount(account)
    if owner is None:
        raise RuntimeError(f"no account {account!r}: set it up with the admin command first")
    recipients = (classifyRecipient(RECIPIENT, owner),)
    message = message_body(MESSAGE_SIZE).removesuffix(b".\r\n")  # DATA without its final dot
    ids: array[int] = array("q")
    waiting: deque[Deferred[Any]] = deque()
    commitsBefore = store.commits
    started = time.perf_counter()

    def enqueueOne() -> Deferred[None]:
        notificationId = store.nextNotificationId()
        now = fromTimestamp(clock.seconds())
        received = receivedHeader(
            hostname=hostname,
            helo=CLIENT_HELO,
            clientAddress="127.0.0.1",
            tlsInfo=None,
            authenticated=False,
            notificationId=notificationId,
            now=now,
            recipients=recipients,
        )
        notification = Notification(
            notification_id=notificationId,
            account=account,
            sender=SENDER,
            recipients=recipients,
            size=len(received) + len(message),
            received_at=now,
            client_address="127.0.0.1",
            helo=CLIENT_HELO,
        )
        ids.append(int(notificationId))
        return store.enqueue(notification, (received, message))

    for first in range(0, count, ENQUEUE_GROUP):
        # Wait for the oldest group (the writer commits in order) only when enough are waiting.
        while waiting and len(waiting) * ENQUEUE_GROUP >= inFlight:
            await waiting.popleft()
        group = [enqueueOne() for _ in range(min(ENQUEUE_GROUP, count - first))]
        waiting.append(gatherResults(group, consumeErrors=True))
    while waiting:
        await waiting.popleft()
    seconds = time.perf_counter() - started
    stats = await store.stats()
    return FillResult(stats.queued, seconds, store.commits - commitsBefore, ids)


CLAIM_ROUNDS = 200
CLAIM_BATCH = 50  # what the delivery loop claims at once


async def timeClaims(store: SQLiteStore, rounds: int = CLAIM_ROUNDS) -> list[float]:
    """Seconds each of ``rounds`` claims of ``CLAIM_BATCH`` due entries takes on the full
    queue with nothing else running (what the queue's size costs a claim), each claim given
    back at once (releaseLease restores the entry as it was)."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        claimed = await store.claimDue(CLAIM_BATCH, 300)
        times.append(time.perf_counter() - started)
        released = [store.releaseLease(d.notification.notification_id, d.lease) for d in claimed]
        await gatherResults(released, consumeErrors=True)
    return times


def fill(config: Path, account: str, count: int, inFlight: int) -> FillResult:
    """Open the store of the relay config ``config`` as the relay's main process would, fill
    it (:func:`fillQueue`) and close it. Runs the global reactor, so once per process."""
    from twisted.internet import reactor as globalReactor  # installed here, not at import

    reactor: Any = globalReactor
    outcome: list[FillResult | Failure] = []

    async def run() -> FillResult:
        settings = loadConfig(str(config))
        store = makeStore(settings, reactor)
        assert isinstance(store, SQLiteStore), "the benchmark measures the SQLite store"
        await store.open()
        try:
            filled = await fillQueue(store, account, count, reactor, settings.hostname, inFlight)
            # What the queue's size costs a claim, not the fill's gigabytes still being written
            # back by the kernel (each claim's commit waits for the disk behind them).
            os.sync()
            filled.claimAlone_s = await timeClaims(store)
            return filled
        finally:
            await store.close()

    def finished(result: FillResult | Failure) -> None:
        outcome.append(result)
        reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(run()).addBoth(finished))
    reactor.run()
    if not outcome:
        raise RuntimeError("the fill was interrupted")
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    assert isinstance(result, FillResult)
    return result


# -- 2. the relay --

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""A ``/metrics`` exposition: each sample's value by (sample name, sorted labels)."""


class Relay:
    """
    mailrelay under ``twistd -n`` with the runner's config (``MAILRELAY_CONFIG``) on the
    relay's defaults, ``workers`` included, delivering to the sink on ``sinkPort``; the
    account set up with the admin command line when made, the relay started by :meth:`start`.
    """

    def __init__(self, workdir: Path, cert: Path, key: Path, sinkPort: int) -> None:
        self.workdir = workdir
        self.ports = {name: free_port() for name in adapters.MAILRELAY_PORTS}
        self.config = workdir / "mailrelay.toml"
        settings = adapters.mailrelay_config(workdir, cert, key, self.ports)
        # The relay's own default for workers, whatever it is now, rather than the runner's 1.
        settings = re.sub(r"(?m)^workers = .*\n", "", settings).split("[delivery]")[0]
        self.config.write_text(settings + MAILRELAY_DELIVERY.format(sink=sinkPort))
        self.logPath = workdir / "mailrelay.log"
        self._proc: subprocess.Popen[bytes] | None = None
        cli = adapters.Mailrelay()._cli
        password = adapters.PASSWORD.encode()
        cli(self.config, "account", "add", adapters.USER, "--password-stdin", stdin=password)
        cli(self.config, "sender", "add", adapters.USER, SENDER_DOMAIN)
        cli(self.config, "account", "set", adapters.USER, "--networks", "127.0.0.0/8")

    @property
    def pid(self) -> int:
        assert self._proc is not None, "the relay has not been started"
        return self._proc.pid

    def workers(self) -> int:
        """The relay's processes, ``workers = "auto"`` decided as the relay decides it."""
        return withProcessCount(loadConfig(str(self.config))).workers

    def start(self) -> None:
        """Start the relay; return once every listener, every worker and the web process
        (when the endpoint has one) serves."""
        twistd = Path(sys.executable).with_name("twistd")
        cmd = [str(twistd if twistd.exists() else shutil.which("twistd") or "twistd")]
        cmd += ["-n", "--pidfile=", "mailrelay", "--config", str(self.config)]
        # The plugin lives in the source tree's twisted/plugins: put the tree on the path.
        paths = os.pathsep.join(filter(None, [str(adapters.REPO), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": paths}
        proc = self._proc = _spawn(cmd, self.logPath, cwd=adapters.REPO, env=env)
        ports = [self.ports[name] for name in ("plain", "starttls", "tls", "web")]

        def exited() -> bool:
            return proc.poll() is not None

        try:
            # The first port must greet with a 220, the others accept.
            wait_until_serving(exited, ports, self.logPath, timeout=300)
            serving = [f"worker {i} serving" for i in range(1, self.workers())]
            if webInOwnProcess(withProcessCount(loadConfig(str(self.config)))):
                serving.append("web process serving")
            wait_for_log_lines(exited, serving, self.logPath, timeout=300)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._proc is not None:
            _terminate(self._proc)


def scrapeMetrics(webPort: int) -> tuple[Samples, float]:
    """Every sample of the relay's ``/metrics`` by (name, labels), and the seconds the scrape
    took (it counts the whole queue in the SQLite store)."""
    started = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{webPort}/metrics", timeout=60) as answer:
        text = answer.read().decode()
    took = time.perf_counter() - started
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples, took


# -- 3. the window: memory and the status API --


@dataclass(frozen=True)
class MemorySample:
    at: float  # time.monotonic()
    mainKiB: int  # the relay's main process
    allKiB: int  # it and its descendants (the workers)


class MemoryWatch(threading.Thread):
    """The relay's RSS (VmRSS) every ``interval`` seconds, in the background."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        super().__init__(name="scale-rss", daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples: list[MemorySample] = []
        self._stopNow = threading.Event()

    def run(self) -> None:
        while not self._stopNow.is_set():
            with contextlib.suppress(OSError, ValueError):  # the relay ended meanwhile
                main = rss_kib(self.pid)
                others = 0
                for child in descendants(self.pid):
                    with contextlib.suppress(OSError, ValueError):  # a worker ended meanwhile
                        others += rss_kib(child)
                self.samples.append(MemorySample(time.monotonic(), main, main + others))
            self._stopNow.wait(self.interval)

    def finish(self) -> list[MemorySample]:
        self._stopNow.set()
        self.join()
        return self.samples


class PeriodicScrape(threading.Thread):
    """Scrapes ``/metrics`` every ``every`` seconds, as Prometheus would: each scrape counts
    the whole queue (on a thread of the store's own, not the reader the status API and the
    claims use). Keeps how long each took."""

    def __init__(self, webPort: int, every: float) -> None:
        super().__init__(name="scale-scrape", daemon=True)
        self.webPort = webPort
        self.every = every
        self.took: list[float] = []
        self._stopNow = threading.Event()

    def run(self) -> None:
        while not self._stopNow.wait(self.every):
            with contextlib.suppress(OSError):
                self.took.append(scrapeMetrics(self.webPort)[1])

    def finish(self) -> list[float]:
        self._stopNow.set()
        self.join()
        return self.took


@dataclass
class StatusLoad:
    """The status API's answers over the window."""

    rate: float  # requests per second asked for
    scheduled: int = 0
    latencies: list[float] = field(default_factory=list)  # from the scheduled time, seconds
    serviceTimes: list[float] = field(default_factory=list)  # from the actual send, seconds
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0  # from the first scheduled send to the last answer

    def fail(self, why: str) -> None:
        self.errors[why] = self.errors.get(why, 0) + 1

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def achievedRate(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0


class Schedule:
    """The open-loop send times: ``rate`` a second from ``start`` until ``start + duration``;
    each free connection takes the next one, however late it is already."""

    def __init__(self, start: float, rate: float, duration: float) -> None:
        self.start = start
        self.rate = rate
        self.total = int(rate * duration)
        self.taken = 0

    def next(self) -> float | None:
        if self.taken >= self.total:
            return None
        at = self.start + self.taken / self.rate
        self.taken += 1
        return at


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _ask(connection: Connection, request: bytes) -> tuple[int, bytes]:
    reader, writer = connection
    writer.write(request)
    return await asyncio.wait_for(readResponse(reader), STATUS_TIMEOUT)


class StatusClient:
    """Asks the status API for random ids among ``ids`` as ``target``'s user."""

    def __init__(self, target: Target, ids: array[int], seed: int) -> None:
        self.target = target
        self.ids = ids
        self._pick = random.Random(seed)

    def request(self) -> bytes:
        return requestBytes(self.target, str(self.ids[self._pick.randrange(len(self.ids))]))

    async def connect(self) -> Connection:
        """A keep-alive connection, warmed up: the first login's password check is done."""
        connection = await asyncio.open_connection(self.target.host, self.target.port)
        for _ in range(STATUS_WARMUP):
            await _ask(connection, self.request())
        return connection

    async def send(self, connection: Connection, schedule: Schedule, load: StatusLoad) -> float:
        """Send on ``connection`` at each slot of ``schedule`` it takes, recording the answers
        in ``load``. Returns the time of its last answer."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        try:
            while (scheduled := schedule.next()) is not None:
                delay = scheduled - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                request = self.request()
                sent = loop.time()
                code, body = await _ask(connection, request)
                last = loop.time()
                if code != 200:
                    load.fail(f"HTTP {code}")
                elif b"CAAS_RECEIVED" not in body:
                    load.fail("200 without the notification's trail")
                else:
                    load.latencies.append(last - scheduled)
                    load.serviceTimes.append(last - sent)
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            load.fail(type(e).__name__)
        except TimeoutError:
            load.fail(f"no answer within {STATUS_TIMEOUT:g} s")
        finally:
            connection[1].close()
            with contextlib.suppress(OSError):
                await connection[1].wait_closed()
        return last


async def driveStatus(
    client: StatusClient,
    rate: float,
    duration: float,
    connections: int,
    atStart: Callable[[], None] = lambda: None,
) -> StatusLoad:
    """Ask at ``rate`` a second for ``duration`` seconds, open loop, over ``connections``
    keep-alive connections, opened and warmed up first (not counted); ``atStart`` is called
    once they are, just before the first slot."""
    loop = asyncio.get_running_loop()
    # One connection logs in first so that the others find the password remembered: a login
    # costs the relay an Argon2 hash (64 MiB for a moment); one per client, not per connection.
    first = await client.connect()
    opened = [first, *await asyncio.gather(*(client.connect() for _ in range(connections - 1)))]
    atStart()
    load = StatusLoad(rate)
    schedule = Schedule(loop.time(), rate, duration)
    ends = await asyncio.gather(*(client.send(c, schedule, load) for c in opened))
    load.scheduled = schedule.total
    if schedule.taken < schedule.total:  # every connection failed before the end
        load.errors["not sent: no connection left"] = schedule.total - schedule.taken
    load.seconds = max(ends) - schedule.start
    return load


# -- 4. the figures --


@dataclass(frozen=True)
class ClaimHistogram:
    """``mailrelay_delivery_claim_seconds`` over a window: the difference of two scrapes."""

    bounds: tuple[float, ...]  # the buckets' upper bounds, ascending, +Inf last
    cumulative: tuple[float, ...]  # claims at or under each bound
    count: float
    seconds: float  # the claims' total time

    @classmethod
    def between(cls, before: Samples, after: Samples) -> ClaimHistogram:
        def delta(key: tuple[str, tuple[tuple[str, str], ...]]) -> float:
            return after.get(key, 0.0) - before.get(key, 0.0)

        buckets = sorted(
            (float(dict(labels)["le"]), delta((name, labels)))
            for name, labels in after
            if name == f"{CLAIM_METRIC}_bucket"
        )
        return cls(
            tuple(bound for bound, _ in buckets),
            tuple(count for _, count in buckets),
            delta((f"{CLAIM_METRIC}_count", ())),
            delta((f"{CLAIM_METRIC}_sum", ())),
        )

    @property
    def mean(self) -> float | None:
        return self.seconds / self.count if self.count else None

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket where the cumulative count reaches ``q`` of all
        (``inf``: beyond the largest finite bound); None without claims."""
        if not self.count:
            return None
        return next(
            (b for b, c in zip(self.bounds, self.cumulative, strict=True) if c >= q * self.count),
            float("inf"),
        )


def _total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile of ``values`` (None if there are none)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class ScaleResult:
    """Everything a run measured."""

    command: str
    fill: FillResult
    processes: int = 1
    window_s: float = 0.0
    delivered: int = 0  # at the sink during the window
    delivered_by_relay: float = 0.0  # the relay's own count of recipients delivered
    queue_before: float = 0.0
    queue_after: float = 0.0
    claims: ClaimHistogram | None = None
    memory: list[MemorySample] = field(default_factory=list)  # from the relay's start
    window_start: float = 0.0  # time.monotonic() of the first status request
    status: StatusLoad | None = None
    scrape_s: tuple[float, float] = (0.0, 0.0)  # the scrapes before and after the window
    scrapes_in_window_s: list[float] = field(default_factory=list)  # with --scrape-every
    relay_cpu_s: float = 0.0  # CPU seconds of the relay's processes over the window
    machine_busy_s: float = 0.0  # ... and of everything on the machine (all cores)

    def rssKiB(self, inWindow: bool = True, main: bool = False) -> int:
        """The highest RSS sampled, in the window or since the relay served, of the main
        process or of all the relay's processes."""
        samples = [m for m in self.memory if not inWindow or m.at >= self.window_start]
        return max((m.mainKiB if main else m.allKiB for m in samples), default=0)

    def targets(self) -> list[tuple[str, bool, str]]:
        """(target, met, why) for each of issue 21's targets."""
        claimP99 = self.claims.quantile(0.99) if self.claims else None
        claims = (
            f"claiming due work under {TARGET_CLAIM_P99_S * 1000:g} ms p99 while delivering",
            claimP99 is not None and claimP99 <= TARGET_CLAIM_P99_S and self.delivered > 0,
            "no claims in the window"
            if claimP99 is None
            else f"p99 <= {_ms(claimP99)}, its bucket's bound; {self.delivered:,} delivered",
        )
        alone = self.fill.claimAlone_s
        aloneP99 = percentile(alone, 0.99) if alone else None
        claimsAlone = (
            f"claiming due work under {TARGET_CLAIM_P99_S * 1000:g} ms p99, the store alone",
            aloneP99 is not None and aloneP99 < TARGET_CLAIM_P99_S,
            "not measured" if aloneP99 is None else f"p99 {_ms(aloneP99)} on the full queue",
        )
        rss = self.rssKiB() * 1024
        memory = (
            f"relay RSS under {TARGET_RSS_BYTES / 1e6:g} MB",
            0 < rss < TARGET_RSS_BYTES,
            f"highest {rss / 1e6:,.0f} MB, all processes, in the window",
        )
        status = self.status
        p99 = percentile(status.latencies, 0.99) if status else None
        asked = status.rate if status else 0.0
        answers = (
            f"status API under {TARGET_STATUS_P99_S * 1000:g} ms p99 at {asked:g} requests/s",
            status is not None
            and p99 is not None
            and p99 < TARGET_STATUS_P99_S
            and not status.errors
            and status.achievedRate >= 0.99 * status.rate,
            "no answers"
            if status is None or p99 is None
            else f"p99 {_ms(p99)} at {status.achievedRate:,.1f}/s, "
            f"{sum(status.errors.values())} errors",
        )
        return [claimsAlone, claims, memory, answers]

    def summary(self) -> dict[str, Any]:
        """The figures as JSON values (no per-request lists)."""
        status, claims, fill = self.status, self.claims, self.fill
        return {
            "command": self.command,
            "fill": {
                "enqueued": len(fill.ids),
                "queued": fill.queued,
                "seconds": fill.seconds,
                "commits": fill.commits,
                "per_second": fill.rate,
            },
            "processes": self.processes,
            "window_s": self.window_s,
            "delivered": self.delivered,
            "delivered_by_relay": self.delivered_by_relay,
            "queue_before": self.queue_before,
            "queue_after": self.queue_after,
            "claims": None
            if claims is None
            else {
                **asdict(claims),
                "mean_s": claims.mean,
                "p50_s": claims.quantile(0.5),
                "p99_s": claims.quantile(0.99),
            },
            "rss_kib": {
                "window_main": self.rssKiB(main=True),
                "window_all": self.rssKiB(),
                "since_start_all": self.rssKiB(inWindow=False),
                "samples": [
                    [round(m.at - self.window_start, 1), m.mainKiB, m.allKiB] for m in self.memory
                ],
            },
            "status": None
            if status is None
            else {
                "rate": status.rate,
                "scheduled": status.scheduled,
                "ok": status.ok,
                "errors": status.errors,
                "achieved_rate": status.achievedRate,
                "p50_s": percentile(status.latencies, 0.5),
                "p99_s": percentile(status.latencies, 0.99),
                "max_s": max(status.latencies, default=None),
                "service_p50_s": percentile(status.serviceTimes, 0.5),
                "service_p99_s": percentile(status.serviceTimes, 0.99),
            },
            "scrape_s": list(self.scrape_s),
            "scrapes_in_window_s": self.scrapes_in_window_s,
            "relay_cpu_s": self.relay_cpu_s,
            "machine_busy_s": self.machine_busy_s,
            "targets": [{"target": t, "met": m, "detail": d} for t, m, d in self.targets()],
        }


def _mb(kib: int) -> str:
    return f"{kib * 1024 / 1e6:,.0f} MB"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds == float("inf"):
        return "beyond the largest bucket"
    return f"{seconds * 1000:,.2f} ms"


def document(result: ScaleResult) -> str:
    """The run as a markdown section: heading, command, machine, table, targets."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    fill, claims, status = result.fill, result.claims, result.status
    perCommit = len(fill.ids) / max(fill.commits, 1)
    window = max(result.window_s, 1e-9)
    rows = [
        ("queued by the fill", f"{fill.queued:,} of {len(fill.ids):,} messages of 2 KiB"),
        ("fill", f"{fill.seconds:,.1f} s = {fill.rate:,.0f} msgs/s, {perCommit:,.0f} per commit"),
        ("relay processes", f"{result.processes}"),
        ("window", f"{result.window_s:,.1f} s"),
        (
            "CPU in the window: the relay / the whole machine",
            f"{100 * result.relay_cpu_s / window:.0f} % / "
            f"{100 * result.machine_busy_s / window:.0f} % of one core "
            f"({os.cpu_count()} cores; the rest: sink, client, anything else running)",
        ),
        (
            "delivered in the window (at the sink)",
            f"{result.delivered:,} = {result.delivered / window:,.0f} msgs/s "
            f"(the relay counted {result.delivered_by_relay:,.0f})",
        ),
        (
            "queue at the window's start / end",
            f"{result.queue_before:,.0f} / {result.queue_after:,.0f}",
        ),
    ]
    alone = result.fill.claimAlone_s
    if alone:
        rows.append(
            (
                f"claim of {CLAIM_BATCH}, the store alone on the full queue: p50 / p99 / max",
                f"{_ms(percentile(alone, 0.5))} / {_ms(percentile(alone, 0.99))} / "
                f"{_ms(max(alone))} ({len(alone)} claims)",
            )
        )
    if claims is not None and claims.count:
        rows += [
            ("claims in the window, mean", f"{claims.count:,.0f}, {_ms(claims.mean)}"),
            (
                "claim p50 / p99 (bucket bounds)",
                f"<= {_ms(claims.quantile(0.5))} / <= {_ms(claims.quantile(0.99))}",
            ),
        ]
    else:
        rows.append(("claims in the window", "none"))
    rows += [
        (
            "relay RSS, highest in the window: main process / all",
            f"{_mb(result.rssKiB(main=True))} / {_mb(result.rssKiB())}",
        ),
        ("relay RSS, highest since it served (logins included)", _mb(result.rssKiB(False))),
    ]
    if status is not None:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(status.errors.items())) or "0"
        rows += [
            ("status API: 200s / errors", f"{status.ok:,} of {status.scheduled:,} / {errors}"),
            ("status API: rate asked / achieved", f"{status.rate:g} / {status.achievedRate:,.1f}"),
            (
                "status API latency p50 / p99 / max, from the scheduled send",
                f"{_ms(percentile(status.latencies, 0.5))} / "
                f"{_ms(percentile(status.latencies, 0.99))} / "
                f"{_ms(max(status.latencies, default=None))}",
            ),
            (
                "status API latency p50 / p99, from the actual send",
                f"{_ms(percentile(status.serviceTimes, 0.5))} / "
                f"{_ms(percentile(status.serviceTimes, 0.99))}",
            ),
        ]
    rows.append(
        ("/metrics scrape before / after", f"{_ms(result.scrape_s[0])} / {_ms(result.scrape_s[1])}")
    )
    if result.scrapes_in_window_s:
        rows.append(
            (
                "/metrics scrapes in the window, slowest",
                f"{len(result.scrapes_in_window_s)}, {_ms(max(result.scrapes_in_window_s))}",
            )
        )
    table = "| measure | value |\n|---|--:|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    verdicts = "".join(
        f"- {'met' if met else 'NOT met'}: {target} ({why})\n"
        for target, met, why in result.targets()
    )
    if fill.seconds > FILL_WARNING_S:
        verdicts += (
            f"\nThe fill took {fill.seconds / 60:,.1f} minutes, more than {FILL_WARNING_S / 60:g}"
            f" (the messages per commit show how well the writer batched it).\n"
        )
    return (
        f"## {when}: scale, {len(fill.ids):,} queued\n\n`{result.command}`\n\n"
        f"Machine: {machine()}\n\n{table}\n{verdicts}"
    )


# -- the command --


def measure(relay: Relay, sink: Sink, filled: FillResult, args: argparse.Namespace) -> ScaleResult:
    """Steps 3 and 4 on the relay that just started to serve. The window runs from the first
    status request (once the connections are warm) to the last answer."""
    result = ScaleResult(command="", fill=filled, processes=1 + len(descendants(relay.pid)))
    webPort = relay.ports["web"]
    marks: dict[str, Any] = {}

    scraper = PeriodicScrape(webPort, args.scrape_every) if args.scrape_every > 0 else None

    def atStart() -> None:
        # Blocking, on the client's loop: nothing is scheduled yet, so nothing waits for it.
        marks["before"], marks["scrapeBefore"] = scrapeMetrics(webPort)
        marks["atSink"] = sink.count()
        marks["cpu"] = (tree_cpu_seconds(relay.pid), machine_busy_seconds())
        result.window_start = time.monotonic()
        if scraper is not None:
            scraper.start()

    target = Target("127.0.0.1", webPort, adapters.USER, adapters.USER, adapters.PASSWORD, [])
    client = StatusClient(target, filled.ids, args.seed)
    watch = MemoryWatch(relay.pid)
    watch.start()
    try:
        result.status = asyncio.run(
            driveStatus(client, args.rate, args.duration, args.connections, atStart)
        )
        result.window_s = time.monotonic() - result.window_start
        result.delivered = sink.count() - marks["atSink"]
        relayCpu, machineBusy = marks["cpu"]
        result.relay_cpu_s = tree_cpu_seconds(relay.pid) - relayCpu
        result.machine_busy_s = machine_busy_seconds() - machineBusy
        if scraper is not None:
            result.scrapes_in_window_s = scraper.finish()
        after, scrapeAfter = scrapeMetrics(webPort)
    finally:
        result.memory = watch.finish()
        if scraper is not None and scraper.is_alive():
            scraper.finish()
    before = marks["before"]
    result.scrape_s = (marks["scrapeBefore"], scrapeAfter)
    result.claims = ClaimHistogram.between(before, after)
    delivered = {"outcome": "delivered"}
    result.delivered_by_relay = _total(after, DELIVERED_METRIC, **delivered) - _total(
        before, DELIVERED_METRIC, **delivered
    )
    result.queue_before = _total(before, "mailrelay_queue_depth")
    result.queue_after = _total(after, "mailrelay_queue_depth")
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--queued", type=int, default=1_000_000, help="messages to fill the queue with")
    p.add_argument("--duration", type=float, default=60.0, help="the measurement window, s")
    p.add_argument("--rate", type=float, default=200.0, help="status API requests per second")
    p.add_argument("--connections", type=int, default=STATUS_CONNECTIONS, help="to the status API")
    p.add_argument(
        "--fill-in-flight", type=int, default=ENQUEUES_IN_FLIGHT, help="enqueues waiting at once"
    )
    p.add_argument(
        "--scrape-every",
        type=float,
        default=0.0,
        metavar="S",
        help="also scrape /metrics every S seconds in the window, as Prometheus would "
        "(default: only before and after it)",
    )
    p.add_argument("--seed", type=int, default=21, help="for the random ids asked for")
    p.add_argument("--keep", type=Path, metavar="DIR", help="make and keep the data dir here")
    p.add_argument("--markdown", type=Path, default=DEFAULT_MARKDOWN, help="write the section here")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.queued < 1 or args.duration <= 0 or args.rate <= 0 or args.connections < 1:
        _parser().error("--queued, --duration, --rate and --connections must be positive")
    if shutil.which(SINK) is None:
        print(f"{SINK} is not installed (Debian package postfix)", file=sys.stderr)
        return 1
    command = "python -m benchmarks.scale " + shlex.join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="mailrelay-scale-") as tmp:
        workdir = (args.keep or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        if (workdir / "data").exists():
            print(f"{workdir / 'data'} exists: the fill needs a fresh data dir", file=sys.stderr)
            return 1
        cert, key = make_cert(workdir)
        sink = Sink(workdir)
        relay: Relay | None = None
        try:
            relay = Relay(workdir, cert, key, sink.port)
            print(f"filling the queue with {args.queued:,} messages ...", file=sys.stderr)
            filled = fill(relay.config, adapters.USER, args.queued, args.fill_in_flight)
            print(
                f"  {filled.queued:,} queued in {filled.seconds:,.1f} s = {filled.rate:,.0f} "
                f"msgs/s, {len(filled.ids) / max(filled.commits, 1):,.0f} per commit",
                file=sys.stderr,
            )
            if filled.seconds > FILL_WARNING_S:
                print(f"  the fill took more than {FILL_WARNING_S / 60:g} minutes", file=sys.stderr)
            print("starting the relay ...", file=sys.stderr, flush=True)
            relay.start()
            print(f"measuring for {args.duration:g} s ...", file=sys.stderr, flush=True)
            result = measure(relay, sink, filled, args)
        finally:
            if relay is not None:
                relay.stop()
            sink.stop()
    result.command = command
    text = document(result)
    print(text)
    args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(result.summary(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
