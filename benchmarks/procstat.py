"""Read a process's CPU time and memory from /proc (Linux only)."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name may contain spaces and parentheses: fields start after the last ')'.
    return raw[raw.rindex(b")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far (all its threads)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _TICKS


def descendants(pid: int) -> list[int]:
    """The live descendants of ``pid`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(_stat_fields(int(entry))[1])
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and all its descendants, the exited (reaped) ones included."""
    fields = _stat_fields(pid)
    total = sum(int(x) for x in fields[11:15]) / _TICKS  # utime, stime, cutime, cstime
    for child in descendants(pid):
        try:
            total += cpu_seconds(child)
        except OSError:
            pass  # exited meanwhile: its parent's cutime/cstime has it now
    return total


def tree_pss_kib(pid: int) -> int:
    """Proportional set size of a process tree, in KiB: shared pages are split, not repeated."""
    total = 0
    for each in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{each}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used (every core, everything but idle)."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / _TICKS


def _status_kib(pid: int, key: bytes) -> int:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def rss_kib(pid: int) -> int:
    """Resident set size now, in KiB."""
    return _status_kib(pid, b"VmRSS:")


def peak_rss_kib(pid: int) -> int:
    """Peak resident set size (VmHWM) since start or the last :func:`reset_peak`, in KiB."""
    return _status_kib(pid, b"VmHWM:")


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (needs permission to write /proc/PID/clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


@dataclass
class ServerUsage:
    """What a server process spent during a measurement window."""

    cpu_s: float = 0.0
    peak_rss_kib: int = 0
    machine_busy_s: float = 0.0  # the whole machine's CPU use over the same window


class ServerMonitor(threading.Thread):
    """
    Measure a server process over the window [start, end] (``time.monotonic`` values).

    Takes a CPU snapshot at each edge and samples RSS every ``interval`` seconds in between,
    so the peak is known even where VmHWM cannot be reset. Runs in a daemon thread that wakes
    a few times a second: negligible next to the load it watches. With ``tree``, the process's
    descendants count too (CPU, and memory as PSS): for servers with a process per session.
    """

    def __init__(
        self, pid: int, start: float, end: float, interval: float = 0.25, tree: bool = False
    ) -> None:
        super().__init__(name=f"monitor-{pid}", daemon=True)
        self.pid = pid
        self.start_at = start
        self.end_at = end
        self.interval = interval
        self.tree = tree
        self.usage = ServerUsage()
        self._stop_early = threading.Event()

    def finish(self) -> ServerUsage:
        """Stop at once (if the load ended early), wait for the thread, return the usage."""
        self._stop_early.set()
        self.join()
        return self.usage

    def run(self) -> None:
        try:
            self._measure()
        except (OSError, ValueError):  # the server died: report what was seen
            pass

    def _measure(self) -> None:
        cpu = tree_cpu_seconds if self.tree else cpu_seconds
        memory = tree_pss_kib if self.tree else rss_kib
        self._stop_early.wait(max(0.0, self.start_at - time.monotonic()))
        cpu0 = cpu(self.pid)
        busy0 = machine_busy_seconds()
        hwm_reset = not self.tree and reset_peak(self.pid)
        peak = memory(self.pid)
        while (left := self.end_at - time.monotonic()) > 0:
            if self._stop_early.wait(min(self.interval, left)):
                break
            peak = max(peak, memory(self.pid))
        self.usage.cpu_s = cpu(self.pid) - cpu0
        self.usage.machine_busy_s = machine_busy_seconds() - busy0
        hwm = peak_rss_kib(self.pid) if hwm_reset else 0
        self.usage.peak_rss_kib = max(peak, hwm)
