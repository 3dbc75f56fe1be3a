"""
The listen backlog of the relay's own sockets, and the kernel's count of connections it dropped
because a listen queue was full.

A listening socket's backlog is how many connections the kernel keeps, handshake done, until the
process accepts them. Twisted's endpoints default to 50: hundreds of clients that connect at once
(a burst of sessions, a client pool reconnecting after a restart) overflow that queue, the kernel
drops their SYNs and each one waits for its SYN retransmit (1 s, then 3 s...). So every endpoint
that listens on a socket of its own (``tcp:``, ``tcp6:``, ``ssl:``, ``tls:``, ``unix:``, also
inside ``haproxy:``) gets :func:`defaultBacklog` unless it names its own ``backlog=``;
``systemd:`` sockets are bound by systemd, with the socket unit's ``Backlog=``. See
docs/listeners.md.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from itertools import pairwise

SOMAXCONN_PATH = "/proc/sys/net/core/somaxconn"
NETSTAT_PATH = "/proc/net/netstat"

WRAPPERS = frozenset({"haproxy"})
"""Endpoint prefixes whose arguments are another endpoint description (what they wrap)."""

BACKLOG_POSITIONS = {"tcp": 2, "tcp6": 1, "ssl": 5, "tls": 2, "unix": 2}
"""Endpoint types that bind a socket of their own, and where their positional arguments (after
the type) put the backlog: Twisted's parsers take e.g. ``tcp:PORT:INTERFACE:BACKLOG`` but
``tcp6:PORT:BACKLOG:INTERFACE``."""


def kernelBacklogLimit(path: str = SOMAXCONN_PATH) -> int:
    """
    The kernel's ``net.core.somaxconn``: the largest backlog ``listen()`` gives a socket (a
    larger one is cut down to it). Where it cannot be read (not Linux), Python's
    ``socket.SOMAXCONN``.
    """
    try:
        with open(path) as f:
            value = int(f.read().strip())
    except (OSError, ValueError):
        return socket.SOMAXCONN
    return value if value > 0 else socket.SOMAXCONN


def defaultBacklog(somaxconnPath: str = SOMAXCONN_PATH) -> int:
    """The backlog of a listener whose endpoint names none: the kernel's limit, so that the
    one setting an operator raises for a burst (``net.core.somaxconn``) raises the relay's too."""
    return kernelBacklogLimit(somaxconnPath)


def _splitUnescaped(text: str, separator: str) -> list[str]:
    """``text`` split at each ``separator`` not escaped by a backslash, escapes kept as they are
    (Twisted's endpoint syntax: ``\\:`` is a colon inside an argument)."""
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def withBacklog(endpoint: str, backlog: int) -> str:
    """
    ``endpoint`` with ``:backlog=BACKLOG`` added if it binds a socket of its own (a type in
    :data:`BACKLOG_POSITIONS`, possibly inside ``haproxy:``) and sets no backlog itself, by
    keyword or by position; any other endpoint string as it is.
    """
    arguments = _splitUnescaped(endpoint, ":")
    kindAt = 0
    while kindAt < len(arguments) - 1 and arguments[kindAt].strip().lower() in WRAPPERS:
        kindAt += 1
    position = BACKLOG_POSITIONS.get(arguments[kindAt].strip().lower())
    if position is None:
        return endpoint
    positional = 0
    for argument in arguments[kindAt + 1 :]:
        keyword = _splitUnescaped(argument, "=")
        if len(keyword) == 1:
            positional += 1
        elif keyword[0].strip() == "backlog":
            return endpoint
    if positional > position:
        return endpoint
    return f"{endpoint}:backlog={backlog}"


@dataclass(frozen=True)
class ListenQueueDrops:
    """The kernel's counts (``TcpExt`` in ``/proc/net/netstat``, the same as ``nstat``) of
    connections lost at listening sockets, since boot, for every socket of the network
    namespace -- not only the relay's."""

    overflows: int
    """``ListenOverflows``: a completed handshake found the accept queue full."""
    drops: int
    """``ListenDrops``: SYNs and handshakes dropped at a listening socket for any reason,
    overflows included."""


def listenQueueDrops(path: str = NETSTAT_PATH) -> ListenQueueDrops | None:
    """The counters as they are now, or None where ``path`` cannot be read or lacks them."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    # Each section is two lines: "TcpExt: Name1 Name2 ..." then "TcpExt: 1 2 ...".
    for names, values in pairwise(lines):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            counters = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            try:
                return ListenQueueDrops(
                    int(counters["ListenOverflows"]), int(counters["ListenDrops"])
                )
            except (KeyError, ValueError):
                return None
    return None
