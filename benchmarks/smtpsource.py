"""
Drive a server with Postfix's own load generator, ``smtp-source`` (Debian package postfix).

A second opinion on the numbers from ``loadgen.py``: another client, written in C, that does
not pipeline (it waits for each reply), so it measures a server under a different rhythm.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import time
from dataclasses import dataclass

from benchmarks.adapters import Listener
from benchmarks.messages import SENDER
from benchmarks.procstat import ServerMonitor, ServerUsage
from mailrelay.listening import listenQueueDrops

SMTP_SOURCE = "smtp-source"


@dataclass
class SourceResult:
    server: str
    sessions: int
    persistent: bool
    messages: int
    elapsed_s: float
    usage: ServerUsage | None
    client_cpu_s: float = 0.0  # smtp-source's own CPU
    failure: str = ""
    # Connections the kernel dropped meanwhile because a listen queue was full (TcpExt
    # ListenOverflows, machine-wide): each such client waited for a SYN retransmit. None: unknown.
    listen_overflows: int | None = None

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.elapsed_s if self.elapsed_s > 0 and not self.failure else 0.0

    @property
    def other_cpu_pct(self) -> float | None:
        """CPU used by everything else on the machine meanwhile, % of one core."""
        if self.usage is None or self.elapsed_s <= 0:
            return None
        other = self.usage.machine_busy_s - self.usage.cpu_s - self.client_cpu_s
        return max(0.0, 100 * other / self.elapsed_s)

    @property
    def label(self) -> str:
        return f"smtp-source 2k-r1-c{self.sessions}-{'persist' if self.persistent else '1per'}"


def available() -> bool:
    return shutil.which(SMTP_SOURCE) is not None


def run_smtp_source(
    server: str,
    listener: Listener,
    server_pid: int,
    *,
    sessions: int = 10,
    messages: int = 10_000,
    size: int = 2048,
    persistent: bool = True,
    tree: bool = False,
    timeout: float = 300.0,
) -> SourceResult:
    """Send ``messages`` messages over ``sessions`` parallel sessions; time the whole run."""
    cmd = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(size)]
    cmd += ["-f", SENDER, "-t", "user0@example.com", "-M", "loadgen.bench.local"]
    if persistent:
        cmd.append("-d")
    cmd.append(f"{listener.host}:{listener.port}")
    start = time.monotonic()
    monitor = ServerMonitor(server_pid, start, start + timeout, tree=tree)
    monitor.start()
    failure = ""
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    drops0 = listenQueueDrops()
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        if done.returncode:
            last = (done.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
            failure = f"failed: {last}"
    except subprocess.TimeoutExpired:
        failure = f"failed: not done within {timeout:.0f} s"
    elapsed = time.monotonic() - start
    drops = listenQueueDrops()
    overflows = drops.overflows - drops0.overflows if drops and drops0 else None
    usage = monitor.finish()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (children.ru_utime - children0.ru_utime) + (children.ru_stime - children0.ru_stime)
    return SourceResult(
        server, sessions, persistent, messages, elapsed, usage, client_cpu, failure, overflows
    )
