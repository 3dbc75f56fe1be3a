"""
systemd's service notification protocol (``Type=notify``), without libsystemd.

systemd hands the service the path of a datagram socket in ``NOTIFY_SOCKET`` (a file system
path, or an abstract socket name written with a leading ``@``); each datagram is one or more
``KEY=VALUE`` lines: ``READY=1`` once the service serves, ``STOPPING=1`` when it begins to
stop, ``RELOADING=1`` while it reloads, ``WATCHDOG=1`` as the watchdog's keep-alive (every
``WATCHDOG_USEC`` / 2 at the latest). See sd_notify(3). Without ``NOTIFY_SOCKET`` every call
here does nothing, so the relay behaves the same outside systemd.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()


class Notifier:
    """Sends states to the socket named by ``environ["NOTIFY_SOCKET"]`` (if any)."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        path = environ.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if path.startswith("@"):
            self.address = b"\0" + path[1:].encode()
        elif path:
            self.address = path
        self._failed = False
        self.watchdogSeconds = _watchdogSeconds(environ)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *states: str) -> bool:
        """Send ``states`` (``"READY=1"``, ...) in one datagram; True if it was sent. A failure
        is logged once (systemd gone, a socket not writable) and otherwise ignored."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto("\n".join(states).encode(), self.address)
        except OSError as e:
            if not self._failed:
                log.warn("systemd notification not sent: {error}", error=str(e))
            self._failed = True
            return False
        return True

    def ready(self) -> bool:
        return self.notify("READY=1", f"STATUS=serving (pid {os.getpid()})")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=draining")

    def reloading(self) -> bool:
        # MONOTONIC_USEC: what Type=notify-reload asks for; harmless for Type=notify.
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def startWatchdog(self, clock: Any) -> LoopingCall | None:
        """Send ``WATCHDOG=1`` every half of the watchdog's interval from the reactor (so a
        hung reactor is noticed); None when the unit sets no watchdog."""
        if self.watchdogSeconds is None or self.address is None:
            return None
        call = LoopingCall(self.notify, "WATCHDOG=1")
        call.clock = clock
        call.start(self.watchdogSeconds / 2, now=True)
        return call


def _watchdogSeconds(environ: Mapping[str, str]) -> float | None:
    """The watchdog's interval in seconds, if it is set for this process (``WATCHDOG_PID``,
    when present, names the process it is for)."""
    usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000
