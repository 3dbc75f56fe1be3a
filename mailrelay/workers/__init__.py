"""
Several intake processes for one relay (``workers = N``), so SMTP sessions use every core.

The main process (``twistd mailrelay``) binds the listening sockets, serves on them itself and
runs the web resource; :class:`~mailrelay.workers.pool.WorkerPool` starts ``N - 1`` more
processes (:mod:`mailrelay.workers.child`) that take over the same listening sockets, so the
kernel hands each new connection to whichever process accepts first. Every process has its own
store connection: the SQLite writers take turns on a lock file, each process makes
notification ids with its own instance number, and the limits kept in memory are shared out
(see :func:`mailrelay.tap.buildCore`).
"""

from collections.abc import Callable
from typing import Any

DELAY_PER_CONNECTION = 0.0001
"""Seconds a process waits before accepting, per connection it already serves."""
MAX_ACCEPT_DELAY = 0.02


def balanceAccepts(port: Any, reactor: Any, openConnections: Callable[[], int]) -> None:
    """
    Share a listening socket's new connections fairly among the processes that listen on it.

    All of them wake up for a new connection and the first to ``accept`` gets it -- on Linux
    that is nearly always the same one (epoll wakes the most recent waiter first), which would
    end up with almost every session. So a process waits a little before accepting, longer the
    more connections it serves (``DELAY_PER_CONNECTION`` each, at most ``MAX_ACCEPT_DELAY``),
    and then takes one connection only: the process with the fewest sessions gets the next.
    """
    if not hasattr(port, "numberAccepts"):
        return
    doRead = port.doRead
    state = "idle"  # -> "waiting" (a delay runs) -> "due" (accept at the next wake-up)

    def resume() -> None:
        nonlocal state
        state = "due"
        if getattr(port, "connected", False):  # not if it stopped listening meanwhile
            port.startReading()

    def doReadFairly() -> Any:
        nonlocal state
        if state == "waiting":
            return None
        delay = min(openConnections() * DELAY_PER_CONNECTION, MAX_ACCEPT_DELAY)
        if state == "idle" and delay:
            state = "waiting"
            port.stopReading()
            reactor.callLater(delay, resume)
            return None
        state = "idle"
        port.numberAccepts = 1
        return doRead()

    port.doRead = doReadFairly
