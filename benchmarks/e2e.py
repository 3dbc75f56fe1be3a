"""
End to end: messages in through SMTP, out through SMTP to Postfix's ``smtp-sink``, counted at the
sink; mailrelay on its default config side by side with Postfix configured as the same relay.

    python -m benchmarks.e2e --quick                  # smoke run, about 2 minutes
    python -m benchmarks.e2e                          # the default run, 10-15 minutes
    python -m benchmarks.e2e --only drain --drain-messages 100000

Three parts (``--only`` picks some):

* ``flow``: ``smtp-source`` (2 KiB and 100 KiB, 10 and 100 sessions) into a relay-by-IP listener,
  the relay delivering to a ``smtp-sink`` as its smarthost (Postfix: ``relayhost``); then
  mailrelay with a DKIM key for the sender domain (what signing on the way out costs);
* ``latency``: the project's load generator in clear, and with STARTTLS + AUTH PLAIN (what TLS
  and AUTH on the way in cost, end to end): its time from the final dot to the ``250``, and
  each message's time from acceptance to delivery, from the relay's own records;
* ``drain``: N messages queued while nothing leaves, then released: messages/s to empty.

Each case gets a fresh relay and a fresh sink. Results go to stdout as markdown and are appended
to benchmarks/RESULTS.md (``--no-record`` to skip).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from benchmarks import adapters, smtpsource
from benchmarks.adapters import Listener, _spawn, _terminate, free_port, wait_until_serving
from benchmarks.certs import make_cert
from benchmarks.loadgen import LoadConfig, raise_fd_limit, run_load
from benchmarks.messages import SENDER
from benchmarks.procstat import cpu_seconds, machine_busy_seconds, tree_cpu_seconds
from benchmarks.report import machine

RESULTS = Path(__file__).with_name("RESULTS.md")
SINK = "smtp-sink"
SENDER_DOMAIN = SENDER.rpartition("@")[2]
SAMPLE_EVERY = 1.0  # seconds between looks at the sink's count and the relay's queue
DRAIN_TIMEOUT = 600.0  # at most this long for the backlog to reach the sink after the load
STALL = 30.0  # ... and give up when nothing reached it for this long


# -- the sink --


class Sink:
    """
    ``smtp-sink -c`` on a loopback port: accepts every message, keeps none, and writes its
    running counters (``sess=… quit=… mesg=…``, one update per message) to a file.
    """

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.counters = workdir / "sink.counters"
        # -u: it runs as root here and must drop privileges; 1024: its listen backlog.
        cmd = [SINK, "-c", "-u", "nobody", "-h", "sink.local", f"127.0.0.1:{self.port}", "1024"]
        self.proc = _spawn(cmd, self.counters)
        wait_until_serving(lambda: self.proc.poll() is not None, [self.port], self.counters)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def count(self) -> int:
        """Messages received so far."""
        with self.counters.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 256))
            found = re.findall(rb"mesg=(\d+)", f.read())
        return int(found[-1]) if found else 0

    def stop(self) -> None:
        _terminate(self.proc)


# -- the relays --


@dataclass
class Delays:
    """Seconds from each message's acceptance to steps of its delivery."""

    claimed: list[float] = field(default_factory=list)  # to the first attempt (CAAS_SENT)
    delivered: list[float] = field(default_factory=list)  # to the sink's 250 (CH_RECEIVED)


class RelayRun(Protocol):
    name: str
    pid: int
    tree: bool  # a process tree: its children's CPU counts too
    listeners: dict[str, Listener]

    def depth(self) -> int:
        """Messages still in the relay's queue."""

    def delays(self) -> Delays:
        """Every delivered message's delays, from the relay's own records."""

    def release(self) -> None:
        """Start delivering what was queued while nothing left (``hold=True``)."""

    def stop(self) -> None:
        """Stop the relay; return when it is gone."""


MAILRELAY_DELIVERY = """\
[delivery]
mode = "smarthost"
smarthost = "tcp:host=127.0.0.1:port={sink}"
"""

MAILRELAY_HOLD = """\
[delivery]
mode = "hold"
"""


@dataclass
class MailrelayRelay(adapters.Mailrelay):
    """
    mailrelay on its defaults (one process per core, the SQLite store; ``workers`` sets a
    number), as the runner's adapter sets it up, with ``[delivery] mode = "smarthost"`` to the
    sink. ``dkim``: the sender domain has a
    signing key (``mailrelay dkim generate``), so every message is signed on the way out.
    """

    dkim: bool = False
    workers: int = 0  # 0: left out of the file, the default ("auto": one process per core)

    @property
    def name(self) -> str:
        suffix = f"-{self.workers}w" if self.workers else ""
        return f"mailrelay{suffix}+dkim" if self.dkim else f"mailrelay{suffix}"

    def run(self, workdir: Path, cert: Path, key: Path, sink: int, hold: bool = False) -> RelayRun:
        return _MailrelayRun(self, workdir, cert, key, sink, hold)


class _MailrelayRun:
    def __init__(
        self, adapter: MailrelayRelay, workdir: Path, cert: Path, key: Path, sink: int, hold: bool
    ) -> None:
        self.name = adapter.name
        self.tree = adapter.workers != 1  # the workers are the main process's children
        self._sink = sink
        self._workdir = workdir
        ports = {name: free_port() for name in adapters.MAILRELAY_PORTS}
        self._ports = ports
        self.config = workdir / "mailrelay.toml"
        self.database = workdir / "data" / "mailrelay.sqlite3"
        self._template = adapters.mailrelay_config(
            workdir, cert, key, ports, workers=adapter.workers or '"auto"'
        ).split("[delivery]")[0]
        self._write_config(hold)
        cli = adapter._cli
        password = adapters.PASSWORD.encode()
        cli(self.config, "account", "add", adapters.USER, "--password-stdin", stdin=password)
        cli(self.config, "sender", "add", adapters.USER, SENDER_DOMAIN)
        cli(self.config, "account", "set", adapters.USER, "--networks", "127.0.0.0/8")
        if adapter.dkim:
            cli(self.config, "dkim", "generate", SENDER_DOMAIN)
        self.listeners = {
            "plain": Listener("127.0.0.1", ports["plain"]),
            "starttls": Listener("127.0.0.1", ports["starttls"], adapters.USER, adapters.PASSWORD),
        }
        self._start()

    def _write_config(self, hold: bool) -> None:
        delivery = MAILRELAY_HOLD if hold else MAILRELAY_DELIVERY.format(sink=self._sink)
        self.config.write_text(self._template + delivery)

    def _start(self) -> None:
        twistd = Path(sys.executable).with_name("twistd")
        cmd = [str(twistd if twistd.exists() else shutil.which("twistd") or "twistd")]
        cmd += ["-n", "--pidfile=", "mailrelay", "--config", str(self.config)]
        log_path = self._workdir / f"{self.name}.log"
        # The plugin lives in the source tree's twisted/plugins: put the tree on the path.
        paths = os.pathsep.join(filter(None, [str(adapters.REPO), os.environ.get("PYTHONPATH")]))
        with contextlib.suppress(FileNotFoundError):
            log_path.rename(log_path.with_suffix(".log.1"))  # the first start's, when released
        self._proc = _spawn(
            cmd, log_path, cwd=adapters.REPO, env={**os.environ, "PYTHONPATH": paths}
        )
        self.pid = self._proc.pid
        ports = [self._ports[sec] for sec in ("plain", "starttls", "tls")]
        try:
            wait_until_serving(lambda: self._proc.poll() is not None, ports, log_path)
        except BaseException:
            _terminate(self._proc)
            raise

    def _read(self, sql: str) -> list[tuple[int, ...]]:
        """``sql``'s rows from the main file and every worker's file."""
        rows: list[tuple[int, ...]] = []
        files = [self.database, *self.database.parent.glob("mailrelay.worker-*.sqlite3")]
        for file in files:
            with contextlib.closing(sqlite3.connect(f"file:{file}?mode=ro", uri=True)) as db:
                rows += db.execute(sql).fetchall()
        return rows

    def depth(self) -> int:
        return sum(count for (count,) in self._read("SELECT count(*) FROM queue"))

    def delays(self) -> Delays:
        rows = self._read(
            "SELECT n.received_at, s.status_code, s.ts FROM status_events s "
            "JOIN notifications n ON n.id = s.notification_id "
            "WHERE s.status_code IN ('CAAS_SENT', 'CH_RECEIVED')"
        )
        out = Delays()
        for received, code, ts in rows:
            (out.claimed if code == "CAAS_SENT" else out.delivered).append((ts - received) / 1000)
        return out

    def release(self) -> None:
        """Restart in smarthost mode (what an operator does to let a held relay deliver)."""
        _terminate(self._proc)
        self._write_config(hold=False)
        self._start()

    def stop(self) -> None:
        _terminate(self._proc)


def _postfix_main(**settings: str) -> str:
    """The runner's Postfix main.cf without its comments, ``settings`` replacing its lines."""
    keep = [
        line
        for line in adapters.POSTFIX_MAIN.splitlines()
        if line and not line.startswith("#") and line.split("=")[0].strip() not in settings
    ]
    return "\n".join([*keep, *(f"{k} = {v}" for k, v in settings.items())]) + "\n"


POSTFIX_RELAY_MASTER = adapters.POSTFIX_MASTER + (
    "smtp      unix  - - n - - smtp\nrelay     unix  - - n - - smtp\n"
)


@dataclass
class PostfixRelay:
    """
    The runner's private Postfix instance, relaying instead of discarding: smtpd → cleanup
    (queue file fsync'd before the 250) → qmgr → the smtp client → ``relayhost`` = the sink.
    Postfix's defaults otherwise (20 connections to the relayhost, ``in_flow_delay = 1s``:
    smtpd slows its clients when the queue manager falls behind).
    """

    name: str = "postfix"

    def run(self, workdir: Path, cert: Path, key: Path, sink: int, hold: bool = False) -> RelayRun:
        return _PostfixRun(workdir, cert, key, sink, hold)


class _PostfixRun:
    QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

    def __init__(self, workdir: Path, cert: Path, key: Path, sink: int, hold: bool) -> None:
        self.name = "postfix"
        self.tree = True
        settings = {
            "default_transport": "smtp",
            "relay_transport": "smtp",
            "relayhost": f"[127.0.0.1]:{sink}",
            "in_flow_delay": "1s",  # Postfix's default; the intake benchmark turns it off
        }
        if hold:
            settings["defer_transports"] = "smtp"  # queued, deferred, until postqueue -f
        adapter = adapters.Postfix(
            name="postfix-relay", main=_postfix_main(**settings), master=POSTFIX_RELAY_MASTER
        )
        self._conf = workdir / "conf"
        self._spool = workdir / "spool"
        self.maillog = workdir / "maillog"
        self._server = adapter.start(workdir, cert, key)
        self.pid = self._server.pid
        self.listeners = self._server.listeners

    def _count(self, queues: tuple[str, ...]) -> int:
        total = 0
        for queue in queues:
            for _, _, files in os.walk(self._spool / queue):
                total += len(files)
        return total

    def depth(self) -> int:
        return self._count(self.QUEUES)

    def deferred(self) -> tuple[int, int]:
        """(messages not yet through the queue manager, messages deferred)."""
        return self._count(("maildrop", "incoming", "active")), self._count(("deferred",))

    def delays(self) -> Delays:
        out = Delays()
        text = self.maillog.read_text(errors="replace") if self.maillog.exists() else ""
        # Postfix's delay= runs from the queue file's creation (at MAIL FROM) to the 250.
        for match in re.finditer(r" delay=([\d.]+),.* status=sent ", text):
            out.delivered.append(float(match.group(1)))
        return out

    def release(self) -> None:
        conf = str(self._conf)
        for cmd in (
            ["postconf", "-c", conf, "-e", "defer_transports ="],
            ["/usr/sbin/postfix", "-c", conf, "reload"],
            ["postqueue", "-c", conf, "-f"],
        ):
            subprocess.run(cmd, capture_output=True, timeout=60, check=True)

    def stop(self) -> None:
        self._server.stop()


class Relay(Protocol):
    @property
    def name(self) -> str: ...

    def run(
        self, workdir: Path, cert: Path, key: Path, sink: int, hold: bool = False
    ) -> RelayRun: ...


# -- watching a case --


class Watch(threading.Thread):
    """Samples (time, messages at the sink, relay queue depth) every second in the background."""

    def __init__(self, sink: Sink, relay: RelayRun) -> None:
        super().__init__(name="e2e-watch", daemon=True)
        self.sink = sink
        self.relay = relay
        self.samples: list[tuple[float, int, int]] = []
        self._stop_now = threading.Event()

    def run(self) -> None:
        while not self._stop_now.is_set():
            with contextlib.suppress(OSError, sqlite3.Error):
                self.samples.append((time.monotonic(), self.sink.count(), self.relay.depth()))
            self._stop_now.wait(SAMPLE_EVERY)

    def finish(self) -> list[tuple[float, int, int]]:
        self._stop_now.set()
        self.join()
        return self.samples


class Usage:
    """CPU of the relay, the sink and this process's children (the clients) between two marks."""

    def __init__(self, relay: RelayRun, sink: Sink) -> None:
        self._relay, self._sink = relay, sink
        self._at = self._read()

    def _read(self) -> tuple[float, float, float, float, float]:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = resource.getrusage(resource.RUSAGE_SELF)
        server = (tree_cpu_seconds if self._relay.tree else cpu_seconds)(self._relay.pid)
        return (
            time.monotonic(),
            server,
            cpu_seconds(self._sink.pid),
            children.ru_utime + children.ru_stime + own.ru_utime + own.ru_stime,
            machine_busy_seconds(),
        )

    def since(self) -> dict[str, float]:
        """Seconds elapsed and CPU seconds of each party since this object was made."""
        now = self._read()
        elapsed, server, sink, clients, busy = (b - a for a, b in zip(self._at, now, strict=True))
        return {
            "elapsed": elapsed,
            "server": server,
            "sink": sink,
            "clients": clients,
            "other": max(0.0, busy - server - sink - clients),
        }


def _wait_for(sink: Sink, count: int, timeout: float) -> float | None:
    """Monotonic time at which the sink had ``count`` messages, or None if not by ``timeout``
    or if nothing arrived for ``STALL`` seconds."""
    now = time.monotonic()
    deadline, seen, moved = now + timeout, -1, now
    while now < deadline and now - moved < STALL:
        if (at := sink.count()) >= count:
            return now
        if at != seen:
            seen, moved = at, now
        time.sleep(0.05)
        now = time.monotonic()
    return None


def _settle(relay: RelayRun, timeout: float = 15.0) -> int:
    """The queue depth once it reaches 0 (outcomes are recorded just after the sink's 250)."""
    deadline = time.monotonic() + timeout
    depth = relay.depth()
    while depth and time.monotonic() < deadline:
        time.sleep(0.2)
        depth = relay.depth()
    return depth


# -- the cases --


@dataclass(frozen=True)
class Case:
    """One load: the client (smtp-source or the load generator), size, sessions, security."""

    client: str  # "smtp-source" | "loadgen"
    size_kib: int
    sessions: int
    security: str = "plain"

    @property
    def label(self) -> str:
        return f"{self.client} {self.size_kib}k-c{self.sessions}-{self.security}"


@dataclass
class FlowResult:
    case: Case
    relay: str
    sent: int = 0  # messages the relay answered 250 to
    window_s: float = 0.0  # the load, from the first message to the client's last reply
    at_sink_in_window: int = 0
    delivered: int = 0
    trip_s: float = 0.0  # from the first message to the last one at the sink
    backlog_end: int = 0  # queue depth when the load ended
    backlog_max: int = 0
    backlog_growth: float = 0.0  # msgs/s the queue grew by over the load's second half
    queue_end: int = 0  # queue depth after everything reached the sink
    cpu: dict[str, float] = field(default_factory=dict)  # over the whole trip
    dot_p50_ms: float | None = None  # the load generator's: final dot to the 250
    dot_p99_ms: float | None = None
    delays: Delays = field(default_factory=Delays)
    failure: str = ""

    @property
    def in_rate(self) -> float:
        return self.sent / self.window_s if self.window_s > 0 else 0.0

    @property
    def sink_rate(self) -> float:
        """Messages per second at the sink while the load ran."""
        return self.at_sink_in_window / self.window_s if self.window_s > 0 else 0.0

    @property
    def e2e_rate(self) -> float:
        """All the messages, in through out: delivered over the trip's wall time."""
        return self.delivered / self.trip_s if self.trip_s > 0 else 0.0


def _smtp_source(listener: Listener, case: Case, messages: int) -> str:
    """Send ``messages`` over ``case.sessions`` persistent sessions; '' or why it failed."""
    cmd = [smtpsource.SMTP_SOURCE, "-d", "-s", str(case.sessions), "-m", str(messages)]
    cmd += ["-l", str(case.size_kib * 1024), "-f", SENDER, "-t", "user0@example.com"]
    cmd += ["-M", "loadgen.bench.local", f"{listener.host}:{listener.port}"]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        return "smtp-source: not done within 600 s"
    if done.returncode:
        return (done.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
    return ""


def _drive(relay: RelayRun, case: Case, cap: int, duration: float, result: FlowResult) -> None:
    """Run the case's client until ``cap`` messages or ``duration`` seconds, whichever first."""
    listener = relay.listeners[case.security]
    if case.client == "loadgen":
        load = run_load(
            LoadConfig(
                host=listener.host,
                port=listener.port,
                security=case.security,
                user=listener.user,
                password=listener.password,
                size=case.size_kib * 1024,
                concurrency=case.sessions,
                messages=0 if cap == sys.maxsize else cap,
                duration=duration,
                warmup=0.0,
            )
        )
        result.sent = load.ok
        result.dot_p50_ms, result.dot_p99_ms = load.p50_ms, load.p99_ms
        if load.errors:
            result.failure = ", ".join(f"{k}: {v}" for k, v in sorted(load.errors.items()))
        return
    # smtp-source counts nothing itself: it is run in chunks until the cap or the time is up,
    # each chunk whole, so the number sent is known.
    chunk = max(1000, 20 * case.sessions)
    end = time.monotonic() + duration
    while result.sent < cap and time.monotonic() < end:
        n = min(chunk, cap - result.sent)
        if failure := _smtp_source(listener, case, n):
            result.failure = failure
            return
        result.sent += n


def flow(
    relay_kind: Relay, case: Case, workdir: Path, cert: Path, key: Path, args: argparse.Namespace
) -> FlowResult:
    """One case on a fresh relay and a fresh sink."""
    result = FlowResult(case, relay_kind.name)
    sink = Sink(workdir)
    try:
        relay = relay_kind.run(workdir, cert, key, sink.port)
    except BaseException:
        sink.stop()
        raise
    watch = Watch(sink, relay)
    try:
        cap = (args.messages_100k if case.size_kib >= 100 else args.messages) or sys.maxsize
        usage = Usage(relay, sink)
        watch.start()
        start = time.monotonic()
        _drive(relay, case, cap, args.duration, result)
        result.window_s = time.monotonic() - start
        result.at_sink_in_window = sink.count()
        result.backlog_end = relay.depth()
        done = _wait_for(sink, result.sent, DRAIN_TIMEOUT)
        result.delivered = sink.count()
        result.trip_s = (done or time.monotonic()) - start
        result.queue_end = _settle(relay)
        result.cpu = usage.since()
        result.delays = relay.delays()
        samples = watch.finish()
        during = [s for s in samples if s[0] <= start + result.window_s]
        result.backlog_max = max([result.backlog_end, *(depth for _, _, depth in samples)])
        half = [s for s in during if s[0] >= start + result.window_s / 2]
        if len(half) >= 2 and half[-1][0] > half[0][0]:
            result.backlog_growth = (half[-1][2] - half[0][2]) / (half[-1][0] - half[0][0])
        if done is None and not result.failure:
            result.failure = f"{result.sent - result.delivered:,} not at the sink after the load"
    finally:
        if watch.is_alive():
            watch.finish()
        relay.stop()
        sink.stop()
    return result


@dataclass
class DrainResult:
    relay: str
    messages: int
    fill_s: float = 0.0
    drain_s: float = 0.0  # from the release to the last message at the sink
    delivered: int = 0
    queue_end: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # over the drain
    failure: str = ""

    @property
    def rate(self) -> float:
        return self.delivered / self.drain_s if self.drain_s > 0 else 0.0


def drain(relay_kind: Relay, messages: int, workdir: Path, cert: Path, key: Path) -> DrainResult:
    """Queue ``messages`` of 2 KiB while nothing leaves, release them, time the drain."""
    result = DrainResult(relay_kind.name, messages)
    sink = Sink(workdir)
    try:
        relay = relay_kind.run(workdir, cert, key, sink.port, hold=True)
    except BaseException:
        sink.stop()
        raise
    try:
        start = time.monotonic()
        fill = FlowResult(Case("smtp-source", 2, 10), relay.name)
        _drive(relay, fill.case, messages, float("inf"), fill)
        result.failure = fill.failure
        if isinstance(relay, _PostfixRun):  # every message through qmgr into deferred first
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while relay.deferred()[0] and time.monotonic() < deadline:
                time.sleep(0.5)
        result.fill_s = time.monotonic() - start
        queued = relay.depth()
        if queued != fill.sent or sink.count():
            result.failure += f" queued {queued:,} of {fill.sent:,}, at the sink {sink.count()}"
        released = time.monotonic()
        relay.release()
        usage = Usage(relay, sink)
        done = _wait_for(sink, fill.sent, DRAIN_TIMEOUT)
        result.drain_s = (done or time.monotonic()) - released
        result.delivered = sink.count()
        result.queue_end = _settle(relay)
        result.cpu = usage.since()
    finally:
        relay.stop()
        sink.stop()
    return result


# -- reporting --


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(values: list[float]) -> str:
    p50, p99 = _pct(values, 0.50), _pct(values, 0.99)
    return "-" if p50 is None or p99 is None else f"{1000 * p50:,.0f} / {1000 * p99:,.0f}"


def _ratio(value: float, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if reference else "-"


def flow_table(results: list[FlowResult]) -> str:
    head = (
        "| case | relay | in msgs/s | at sink msgs/s (load) | end to end msgs/s | vs postfix "
        "| delivered | queue at load end (max) | queue growth msgs/s | queue at end "
        "| relay CPU s/1k | relay CPU % | sink CPU % | other CPU % | result |\n"
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|\n"
    )
    postfix = {r.case: r.e2e_rate for r in results if r.relay == "postfix"}
    lines = []
    for r in results:
        cpu, trip = r.cpu, r.cpu.get("elapsed", 0.0)
        per_1k = 1000 * cpu["server"] / r.delivered if r.delivered and cpu else 0.0

        def pct(part: str, cpu: dict[str, float] = cpu, trip: float = trip) -> str:
            return f"{100 * cpu[part] / trip:.0f}" if trip else "-"

        lines.append(
            f"| {r.case.label} | {r.relay} | {r.in_rate:,.0f} | {r.sink_rate:,.0f} "
            f"| {r.e2e_rate:,.0f} | {_ratio(r.e2e_rate, postfix.get(r.case))} "
            f"| {r.delivered:,} of {r.sent:,} | {r.backlog_end:,} ({r.backlog_max:,}) "
            f"| {r.backlog_growth:+,.0f} | {r.queue_end:,} | {per_1k:.3f} | {pct('server')} "
            f"| {pct('sink')} | {pct('other')} | {r.failure or 'ok'} |"
        )
    return head + "\n".join(lines) + "\n"


def latency_table(results: list[FlowResult]) -> str:
    head = (
        "| case | relay | dot → 250 p50 / p99 ms | accepted → first attempt p50 / p99 ms "
        "| accepted → at the sink p50 / p99 ms |\n|---|---|--:|--:|--:|\n"
    )
    lines = []
    for r in results:
        dot = (
            f"{r.dot_p50_ms:.1f} / {r.dot_p99_ms:.1f}"
            if r.dot_p50_ms is not None and r.dot_p99_ms is not None
            else "-"
        )
        lines.append(
            f"| {r.case.label} | {r.relay} | {dot} | {_ms(r.delays.claimed)} "
            f"| {_ms(r.delays.delivered)} |"
        )
    return head + "\n".join(lines) + "\n"


def drain_table(results: list[DrainResult]) -> str:
    head = (
        "| drain | relay | queued in s | drain s | msgs/s | vs postfix | delivered "
        "| queue at end | relay CPU s/1k | relay CPU % | other CPU % | result |\n"
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|\n"
    )
    postfix = {r.messages: r.rate for r in results if r.relay == "postfix"}
    lines = []
    for r in results:
        cpu, took = r.cpu, r.cpu.get("elapsed", 0.0)
        per_1k = 1000 * cpu["server"] / r.delivered if r.delivered and cpu else 0.0
        srv = f"{100 * cpu['server'] / took:.0f}" if took else "-"
        other = f"{100 * cpu['other'] / took:.0f}" if took else "-"
        lines.append(
            f"| {r.messages:,} x 2k | {r.relay} | {r.fill_s:.1f} | {r.drain_s:.1f} "
            f"| {r.rate:,.0f} | {_ratio(r.rate, postfix.get(r.messages))} "
            f"| {r.delivered:,} | {r.queue_end:,} | {per_1k:.3f} | {srv} | {other} "
            f"| {r.failure.strip() or 'ok'} |"
        )
    return head + "\n".join(lines) + "\n"


def document(
    command: str, flows: list[FlowResult], latencies: list[FlowResult], drains: list[DrainResult]
) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"## {when}: end to end\n", f"`{command}`\n", f"Machine: {machine()}\n"]
    if flows or latencies:
        parts.append(flow_table(flows + latencies))
    if flows or latencies:
        parts.append(latency_table(flows + latencies))
    if drains:
        parts.append(drain_table(drains))
    return "\n".join(parts) + "\n"


# -- the command --

PARTS = ("flow", "latency", "drain")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--quick", action="store_true", help="2 KiB, 10 sessions, 3,000 messages")
    p.add_argument("--only", action="append", choices=PARTS, help="run only this part (repeatable)")
    p.add_argument(
        "--messages", type=int, help="cap per 2 KiB case (default 20,000, --quick 3,000); 0: none"
    )
    p.add_argument("--messages-100k", type=int, default=10_000, help="cap per 100 KiB case")
    p.add_argument("--duration", type=float, default=60.0, help="cap per case, s")
    p.add_argument("--drain-messages", type=int, help="default 20,000 (--quick 3,000)")
    p.add_argument(
        "--relays",
        default="mailrelay,postfix",
        help="comma-separated: mailrelay (its defaults), mailrelay-1w (workers = 1), postfix",
    )
    p.add_argument("--keep", type=Path, metavar="DIR", help="keep logs and data here")
    p.add_argument("--no-record", action="store_true", help="don't append to RESULTS.md")
    return p


def _relay(name: str) -> Relay:
    """``postfix``, ``mailrelay`` (its default config) or ``mailrelay-Nw`` (``workers = N``)."""
    if name == "postfix":
        return PostfixRelay()
    match = re.fullmatch(r"mailrelay(?:-(\d+)w)?", name)
    if match is None:
        raise SystemExit(f"--relays: not a relay: {name!r}")
    return MailrelayRelay(workers=int(match.group(1) or 0))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    parts = args.only or list(PARTS)
    for tool in (SINK, smtpsource.SMTP_SOURCE):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (Debian package postfix)", file=sys.stderr)
            return 1
    names = args.relays.split(",")
    relays: list[Relay] = [_relay(name) for name in names]
    if "postfix" in names and (reason := adapters.Postfix().unavailable()):
        print(f"postfix: {reason}", file=sys.stderr)
        return 1
    default = 3000 if args.quick else 20_000
    args.messages = default if args.messages is None else args.messages
    args.drain_messages = args.drain_messages or default
    sizes, sessions = ([2], [10]) if args.quick else ([2, 100], [10, 100])
    raise_fd_limit()
    mailrelay = [r for r in relays if isinstance(r, MailrelayRelay)]
    plans: dict[str, list[tuple[Relay, Case]]] = {"flow": [], "latency": []}
    for size in sizes:
        for n in sessions:
            plans["flow"] += [(relay, Case("smtp-source", size, n)) for relay in relays]
    plans["flow"] += [
        (MailrelayRelay(workers=r.workers, dkim=True), Case("smtp-source", 2, 10))
        for r in mailrelay
    ]
    plans["latency"] += [(relay, Case("loadgen", 2, 10)) for relay in relays]
    plans["latency"] += [(relay, Case("loadgen", 2, 10, "starttls")) for relay in mailrelay]

    results: dict[str, list[FlowResult]] = {"flow": [], "latency": []}
    drains: list[DrainResult] = []
    with tempfile.TemporaryDirectory(prefix="mailrelay-e2e-") as tmp:
        base = args.keep or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)  # Postfix's unprivileged daemons must reach their data directory
        cert, key = make_cert(base)
        for part in ("flow", "latency"):
            if part not in parts:
                continue
            for relay, case in plans[part]:
                workdir = base / f"{case.label.replace(' ', '-')}-{relay.name}"
                shutil.rmtree(workdir, ignore_errors=True)
                workdir.mkdir()
                print(f"{case.label} on {relay.name} ...", file=sys.stderr, flush=True)
                r = flow(relay, case, workdir, cert, key, args)
                print(
                    f"  in {r.in_rate:,.0f}/s, end to end {r.e2e_rate:,.0f}/s, "
                    f"{r.delivered:,} of {r.sent:,} delivered {r.failure}",
                    file=sys.stderr,
                    flush=True,
                )
                results[part].append(r)
                if not args.keep:
                    shutil.rmtree(workdir, ignore_errors=True)  # 100 KiB cases leave gigabytes
        if "drain" in parts:
            for relay in relays:
                workdir = base / f"drain-{relay.name}"
                shutil.rmtree(workdir, ignore_errors=True)
                workdir.mkdir()
                print(f"drain {args.drain_messages:,} on {relay.name} ...", file=sys.stderr)
                d = drain(relay, args.drain_messages, workdir, cert, key)
                print(f"  {d.rate:,.0f}/s, {d.delivered:,} delivered {d.failure}", file=sys.stderr)
                drains.append(d)
                if not args.keep:
                    shutil.rmtree(workdir, ignore_errors=True)

    command = "python -m benchmarks.e2e " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = document(command.strip(), results["flow"], results["latency"], drains)
    print(text)
    if not args.no_record:
        with RESULTS.open("a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
