"""
The load generator counts what it sends, against the benchmark baselines on real sockets.

These check counts only, never timings: the benchmarks themselves are run with
``python -m benchmarks.run``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import time
from argparse import Namespace
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from benchmarks import adapters
from benchmarks.certs import make_cert
from benchmarks.loadgen import LoadConfig, hold_idle, run_load
from benchmarks.run import plan
from benchmarks.servers.twisted_plain import listen

try:
    import aiosmtpd  # noqa: F401  (the bench extra's baseline server)
except ImportError:
    _NO_AIOSMTPD: str | None = "aiosmtpd is not installed: pip install '.[bench]'"
else:
    _NO_AIOSMTPD = None

_Steps = Generator[defer.Deferred[Any], Any, None]


class LoadgenAgainstTwistedBaselineTests(TestCase):
    """The plain Twisted baseline runs in the test's reactor; the load generator in a thread."""

    @defer.inlineCallbacks
    def setUp(self) -> _Steps:  # type: ignore[override]
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        cert, key = make_cert(directory)
        args = Namespace(
            host="127.0.0.1",
            port=0,
            starttls_port=0,
            tls_port=0,
            cert=cert,
            key=key,
            user="bench",
            password="secret",
        )
        ports = yield defer.gatherResults(listen(reactor, args))
        for port in ports:
            self.addCleanup(port.stopListening)
        self.plain, self.starttls, self.tls = (p.getHost().port for p in ports)

    def load(self, **kwargs: object) -> defer.Deferred[object]:
        settings: dict[str, Any] = {"warmup": 0, "duration": 60, "grace": 10, **kwargs}
        cfg = LoadConfig(host="127.0.0.1", **settings)
        return threads.deferToThread(run_load, cfg, os.getpid())

    @defer.inlineCallbacks
    def test_persistentPipelined(self) -> _Steps:
        """Every message sent on persistent sessions is counted once; the server is measured."""
        result = yield self.load(port=self.plain, messages=23, concurrency=4, rcpts=3)
        self.assertEqual((result.ok, result.errors), (23, {}))
        self.assertEqual(result.config.messages, 23)
        self.assertIsNotNone(result.server)

    @defer.inlineCallbacks
    def test_onePerConnectionStartTLS(
        self,
    ) -> _Steps:
        """One message per session over STARTTLS with AUTH PLAIN."""
        result = yield self.load(
            port=self.starttls,
            security="starttls",
            user="bench",
            password="secret",
            messages=7,
            concurrency=3,
            per_connection=1,
            size=10_000,
        )
        self.assertEqual((result.ok, result.errors), (7, {}))

    @defer.inlineCallbacks
    def test_implicitTLSWrongPassword(
        self,
    ) -> _Steps:
        """A refused AUTH is counted by step and code, and nothing is sent."""
        result = yield self.load(
            port=self.tls,
            security="tls",
            user="bench",
            password="wrong",
            messages=2,
            concurrency=1,
            duration=0.5,
        )
        self.assertEqual(result.ok, 0)
        self.assertEqual(set(result.errors), {"AUTH:535"})

    @defer.inlineCallbacks
    def test_idle(self) -> _Steps:
        """Idle sessions are held after EHLO and counted."""
        cfg = LoadConfig(host="127.0.0.1", port=self.plain)
        result = yield threads.deferToThread(hold_idle, cfg, 12, None, 0.0)
        self.assertEqual((result.requested, result.held, result.errors), (12, 12, {}))


class LoadgenAgainstAiosmtpdTests(TestCase):
    """The aiosmtpd baseline's handler, run by aiosmtpd's own threaded controller."""

    skip = _NO_AIOSMTPD

    def setUp(self) -> None:
        from aiosmtpd.controller import Controller

        from benchmarks.servers.aiosmtpd_plain import DiscardingHandler

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        controller = Controller(DiscardingHandler(), hostname="127.0.0.1", port=port)
        controller.start()
        self.addCleanup(controller.stop)
        self.port = port

    def test_pipelinedWithoutLoop(self) -> None:
        """PIPELINING is advertised, and the load generator counts a count-bounded run."""
        cfg = LoadConfig(port=self.port, messages=11, concurrency=2, rcpts=5, warmup=0)
        result = run_load(cfg)
        self.assertEqual((result.ok, result.errors), (11, {}))


class NoStoreColumnTests(TestCase):
    """
    The ``mailrelay-nostore`` diagnostic column: the real relay under twistd answers 250 with
    an id, but keeps nothing, and says so in its log.
    """

    def test_acceptsAndKeepsNothing(self) -> None:
        workdir = Path(self.mktemp()).resolve()  # the adapter runs commands from the repo
        workdir.mkdir(parents=True)
        cert, key = make_cert(workdir)
        server = adapters.ALL["mailrelay-nostore"].start(workdir, cert, key)
        self.addCleanup(server.stop)
        listener = server.listeners["plain"]
        with smtplib.SMTP(listener.host, listener.port, timeout=30) as client:
            message = b"From: a@bench.example\r\nSubject: x\r\n\r\nbody\r\n"
            client.ehlo()
            client.mail("a@bench.example")
            client.rcpt("b@example.com")
            code, reply = client.data(message)
        self.assertEqual(code, 250, reply)
        self.assertIn(b" id=", reply)
        database = sqlite3.connect(workdir / "data" / "mailrelay.sqlite3")
        self.addCleanup(database.close)
        self.assertEqual(database.execute("SELECT COUNT(*) FROM notifications").fetchone(), (0,))
        self.assertIn("stores NOTHING", server.log_path.read_text())


class ServeAndWriterProbeTests(TestCase):
    """
    ``python -m benchmarks.serve`` keeps one of the runner's servers up until SIGTERM; with
    ``benchmarks/probes/writerstats`` on its ``PYTHONPATH``, that relay logs its writer
    thread's timings.
    """

    def test_serveWithWriterStats(self) -> None:
        repo = Path(adapters.__file__).resolve().parent.parent
        workdir = Path(self.mktemp()).resolve()
        probe = repo / "benchmarks" / "probes" / "writerstats"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(probe), str(repo)])}
        serve = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.serve", "mailrelay-sqlite", "--keep", str(workdir)],
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
        )
        self.addCleanup(serve.wait, 60)
        self.addCleanup(serve.terminate)  # it stops the relay it started
        assert serve.stdout is not None
        info = json.loads(serve.stdout.readline())
        self.assertEqual(info["server"], "mailrelay-sqlite")

        MESSAGE = b"From: a@bench.example\r\nSubject: x\r\n\r\nhi\r\n"

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", info["plain"], timeout=30) as client:
                client.sendmail("a@bench.example", ["b@example.com"], MESSAGE)

        send()
        time.sleep(3.2)  # the probe reports at the first group after 3 s
        send()
        self.assertRegex(
            Path(info["log"]).read_text(),
            r"writerstats: [\d.]+ s, [\d,]+ groups, [\d.]+ msgs/group; per group \(us\): idle ",
        )
        serve.send_signal(signal.SIGTERM)
        self.assertEqual(serve.wait(60), 0)
        with self.assertRaises(ProcessLookupError):
            os.kill(info["pid"], 0)  # the relay is gone too
        database = sqlite3.connect(workdir / "data" / "mailrelay.sqlite3")
        self.addCleanup(database.close)
        self.assertEqual(database.execute("SELECT COUNT(*) FROM notifications").fetchone(), (2,))


class PlanTests(TestCase):
    """``--repeat`` runs a scenario's servers in rounds, not one server's tries in a row."""

    def test_rounds(self) -> None:
        servers = [adapters.ALL[name] for name in ("twisted-plain", "aiosmtpd", "postfix")]
        names = [adapter.name for adapter in plan(servers, 2)]
        self.assertEqual(names, ["twisted-plain", "aiosmtpd", "postfix"] * 2)
        self.assertEqual(plan(servers, 1), servers)


class ProtocolBenchTests(TestCase):
    def test_everyMessageAccepted(self) -> None:
        """The protocol benchmark's session accepts what it is fed (it counts the 250s and
        stops otherwise), so its figure is the cost of accepted messages."""
        from benchmarks.protocol_bench import microsecondsPerMessage

        self.assertGreater(microsecondsPerMessage(size=4096, messages=50, repeat=1), 0)


class ScaleBenchmarkTests(TestCase):
    """
    ``python -m benchmarks.scale`` with tiny numbers: the fill queues every message, the relay
    delivers from the backlog to ``smtp-sink`` and answers every status request with a 200,
    and the claim histogram is read from its ``/metrics``. Counts only, never timings.
    """

    skip = (
        None if shutil.which("smtp-sink") else "smtp-sink is not installed (Debian package postfix)"
    )

    def test_smallRun(self) -> None:
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        figures = workdir / "scale.json"
        command = [sys.executable, "-m", "benchmarks.scale", "--queued", "300", "--duration"]
        command += ["3", "--rate", "20", "--keep", str(workdir / "run")]
        command += ["--markdown", str(workdir / "scale.md"), "--json", str(figures)]
        repo = Path(adapters.__file__).resolve().parent.parent
        done = subprocess.run(command, cwd=repo, capture_output=True, timeout=120, check=False)
        self.assertEqual(done.returncode, 0, done.stderr.decode(errors="replace")[-3000:])
        summary = json.loads(figures.read_text())
        self.assertEqual((summary["fill"]["enqueued"], summary["fill"]["queued"]), (300, 300))
        status = summary["status"]
        self.assertEqual((status["scheduled"], status["ok"], status["errors"]), (60, 60, {}))
        self.assertGreater(summary["claims"]["count"], 0)
        self.assertGreater(summary["rss_kib"]["window_all"], 0)
        self.assertIn("scale, 300 queued", (workdir / "scale.md").read_text())
