"""
Sharing new connections fairly among the processes that listen on one socket.

All of them wake up for a new connection and the first to ``accept`` gets it -- on Linux that
is nearly always the same one (epoll wakes the most recent waiter first), which would end up
with almost every session. So every process publishes how many connections it serves in a
:class:`LoadTable` (shared memory, one slot per process), and one that serves more than the
least busy one waits a little before it accepts: ``DELAY_PER_CONNECTION`` per connection of
difference, at most ``MAX_ACCEPT_DELAY``. The least busy take new connections at once, so
nothing limits the rate at which a relay accepts while its processes are evenly loaded.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable
from typing import Any

DELAY_PER_CONNECTION = 0.0001
"""Seconds a process waits before accepting, per connection it serves beyond the least busy."""
MAX_ACCEPT_DELAY = 0.02
_SLOT = struct.Struct("=q")
ABSENT = -1
"""A slot's value while its process does not serve (not started yet, ended)."""


class LoadTable:
    """Open connections per relay process, in memory shared by all of them (``memfd``)."""

    def __init__(self, fd: int, processes: int) -> None:
        self.fd = fd
        self.processes = processes
        self._memory = mmap.mmap(fd, _SLOT.size * processes)

    @classmethod
    def create(cls, processes: int) -> LoadTable:
        """A new table (every slot ABSENT); its ``fd`` is inherited by the workers."""
        fd = os.memfd_create("mailrelay-load", 0)  # not close-on-exec: for the workers
        os.ftruncate(fd, _SLOT.size * processes)
        table = cls(fd, processes)
        for index in range(processes):
            table.set(index, ABSENT)
        return table

    def set(self, index: int, connections: int) -> None:
        _SLOT.pack_into(self._memory, _SLOT.size * index, connections)

    def get(self, index: int) -> int:
        return int(_SLOT.unpack_from(self._memory, _SLOT.size * index)[0])

    def least(self) -> int:
        """The fewest connections any serving process has (0 if none serves)."""
        loads = [value for (value,) in _SLOT.iter_unpack(self._memory) if value != ABSENT]
        return min(loads, default=0)


def balanceAccepts(
    port: Any, reactor: Any, mine: Callable[[], int], least: Callable[[], int]
) -> None:
    """
    Make ``port`` (a listening tcp.Port shared with other processes) take one connection per
    wake-up, at once if this process serves no more connections (``mine()``) than the least
    busy one (``least()``), else after a delay that grows with the difference.
    """
    if not hasattr(port, "numberAccepts"):
        return
    doRead = port.doRead
    waiting = False

    def acceptOne() -> Any:
        port.numberAccepts = 1
        return doRead()

    def resume() -> None:
        nonlocal waiting
        waiting = False
        if getattr(port, "connected", False):  # not if it stopped listening meanwhile
            port.startReading()
            acceptOne()  # its turn has come: take one (none left is fine)

    def doReadFairly() -> Any:
        nonlocal waiting
        if waiting:
            return None
        delay = min((mine() - least()) * DELAY_PER_CONNECTION, MAX_ACCEPT_DELAY)
        if delay > 0:
            waiting = True
            port.stopReading()
            reactor.callLater(delay, resume)
            return None
        return acceptOne()

    port.doRead = doReadFairly
