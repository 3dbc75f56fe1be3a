"""Tests for mailrelay.tap: options, the service tree, and start-up failures in one line."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.python import usage
from twisted.trial.unittest import TestCase

from mailrelay.config import AUTO_MAX_WORKERS
from mailrelay.core import GC_THRESHOLDS, GIL_SWITCH_INTERVAL
from mailrelay.tap import ConfigurationError, ListenerService, Options, makeService
from mailrelay.workers.pool import WorkerPool
from tests.relay_fixture import RelayProcess


class TapTests(TestCase):
    def configFile(self, text: str) -> str:
        directory = Path(self.mktemp())
        directory.mkdir()
        path = directory / "mailrelay.toml"
        path.write_text(f'data_dir = "{directory / "data"}"\n' + text)
        return str(path)

    def options(self, text: str) -> Options:
        options = Options()
        options.parseOptions(["--config", self.configFile(text)])
        return options

    def test_configError(self) -> None:
        """A config error ends the start with its one line (a SystemExit: twistd would print
        its whole usage block above a UsageError)."""
        options = Options()
        path = self.configFile("[limits]\nmax_recipents = 5\n")
        with self.assertRaises(ConfigurationError) as caught:
            options.parseOptions(["--config", path])
        self.assertIsInstance(caught.exception, SystemExit)
        self.assertTrue(str(caught.exception).startswith("mailrelay: configuration: "))
        self.assertIn("limits.max_recipents", str(caught.exception))

    def test_badLogFormatIsAUsageError(self) -> None:
        with self.assertRaises(usage.UsageError):
            Options().parseOptions(["--log-format", "xml"])

    def test_configErrorUnderTwistd(self) -> None:
        """``twistd mailrelay`` with a bad config: stderr is the one line saying what is
        wrong, nothing on stdout (no usage block), exit status 1."""
        path = self.configFile("[limits]\nmax_recipents = 5\n")
        done = subprocess.run(
            RelayProcess.command(Path(path)),
            env=RelayProcess.environment(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(done.returncode, 1, done)
        self.assertEqual(done.stdout, "", done)
        self.assertNotIn("Usage:", done.stderr)
        lines = done.stderr.splitlines()
        self.assertEqual(len(lines), 1, done.stderr)
        self.assertTrue(lines[0].startswith("mailrelay: configuration: "), lines)
        self.assertIn("limits.max_recipents", lines[0])

    def test_serviceTree(self) -> None:
        options = self.options(
            '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\nsecurity = "starttls"\n'
            '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\nsecurity = "tls"\n'
            '[web]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
        )
        self.addCleanup(sys.setswitchinterval, sys.getswitchinterval())
        self.addCleanup(gc.set_threshold, *gc.get_threshold())
        sys.setswitchinterval(0.005)
        gc.set_threshold(700, 10, 10)
        root = makeService(options, reactor)
        self.assertEqual(sys.getswitchinterval(), GIL_SWITCH_INTERVAL)  # shorter GIL turns
        self.assertEqual(gc.get_threshold(), GC_THRESHOLDS)  # fewer garbage collections
        listeners = [s for s in root if isinstance(s, ListenerService)]
        # workers left out: one process per core (the main one and the pool's workers).
        processes = min(os.cpu_count() or 1, AUTO_MAX_WORKERS)
        pools = [s for s in root if isinstance(s, WorkerPool)]
        self.assertEqual(sum(pool.count for pool in pools) + 1, processes)
        # Two SMTP listeners and the web endpoint; with several processes, the web endpoint
        # has a process of its own, and the main process a private listener it forwards to.
        webProcess = processes > 1
        self.assertEqual(len(listeners), 3 + webProcess)
        self.assertEqual([pool.web is not None for pool in pools], [True] * webProcess)
        if webProcess:
            (pool,) = pools
            assert pool.web is not None
            self.assertEqual(pool.web.listener.description, "tcp:0:interface=127.0.0.1")
            self.assertEqual(pool.web.forward.description, "tcp:0:interface=127.0.0.1")
            self.assertEqual(listeners[-2:], [pool.web.listener, pool.web.forward])
        data = Path(options["config"]).parent / "data"
        self.assertTrue((data / "selfsigned-cert.pem").exists())
        self.assertEqual((data / "selfsigned-key.pem").stat().st_mode & 0o777, 0o600)
        # The data directory holds password hashes and messages: only its owner may look in.
        self.assertEqual(data.stat().st_mode & 0o777, 0o700)
        self.assertEqual((data / "spool").stat().st_mode & 0o777, 0o700)

    def test_badEndpoint(self) -> None:
        options = self.options('[[listeners]]\nendpoint = "tcpx:25"\nsecurity = "none"\n')
        with self.assertRaises(SystemExit) as caught:
            makeService(options, reactor)
        self.assertIn("tcpx:25", str(caught.exception))

    def test_unreadableCertificate(self) -> None:
        options = self.options(
            '[tls]\ncertificate = "/nonexistent/cert.pem"\nkey = "/nonexistent/key.pem"\n'
            '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
        )
        with self.assertRaises(SystemExit) as caught:
            makeService(options, reactor)
        self.assertIn("TLS", str(caught.exception))

    def test_portInUse(self) -> None:
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        options = self.options(
            f'[[listeners]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\nsecurity = "none"\n'
            '[web]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
        )
        root = makeService(options, reactor)
        with self.assertRaises(SystemExit) as caught:
            root.privilegedStartService()
        self.assertIn(f"cannot listen on tcp:{port}", str(caught.exception))
        for service in root:
            if isinstance(service, ListenerService) and service._waitingForPort is not None:
                # The port that failed to bind leaves None here; any other is closed.
                service._waitingForPort.addCallback(
                    lambda port: port.stopListening() if port is not None else None
                )

    def test_dataDirUncreatable(self) -> None:
        blocker = Path(self.mktemp())
        blocker.write_text("a file where a directory should be")
        options = Options()
        path = blocker.parent / "uncreatable.toml"
        path.write_text(
            f'data_dir = "{blocker / "data"}"\n[[listeners]]\nendpoint = "tcp:0"\n'
            'security = "none"\n'
        )
        options.parseOptions(["--config", str(path)])
        with self.assertRaises(SystemExit) as caught:
            makeService(options, reactor)
        self.assertIn("data_dir", str(caught.exception))
