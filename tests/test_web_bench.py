"""
Smoke test of ``benchmarks/status_bench.py``: a short self-served run answers every request
with the notification's events.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

REPO_ROOT = Path(__file__).resolve().parent.parent


class StatusBenchTests(TestCase):
    def test_selfServedRun(self) -> None:
        command = [sys.executable, "-m", "benchmarks.status_bench", "--json"]
        command += ["--connections", "2", "--requests", "40", "--warmup", "1"]
        command += ["--notifications", "3", "--duration", "30"]
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, timeout=120, check=False)
        self.assertEqual(done.returncode, 0, done.stderr)
        summary = json.loads(done.stdout)
        self.assertEqual(summary["requests_ok"], 40)
        self.assertEqual(summary["errors"], {})
        self.assertGreater(summary["requests_per_second"], 0)
        self.assertIn("server_cpu_us_per_request", summary)

    def test_refusesNonLoopback(self) -> None:
        command = [sys.executable, "-m", "benchmarks.status_bench", "--url"]
        command += ["http://192.0.2.1:8025", "--user", "a", "--password", "b", "--id", "1"]
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, timeout=60, check=False)
        self.assertNotEqual(done.returncode, 0)
        self.assertIn(b"loopback", done.stderr)
