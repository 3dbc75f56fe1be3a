"""
Writing a short reply or command to a plain TCP connection at once.

Twisted's TCP transport never sends in ``write``: it keeps the bytes, asks the reactor to
watch the socket for room (an ``epoll_ctl``), sends them when the reactor's next turn reports
it writable, and stops watching (another ``epoll_ctl``). For a conversation of short turns,
where each side waits for the other's line (SMTP without pipelining: MAIL, RCPT, DATA, the
message, each answered before the next), that is two system calls and a reactor dispatch more
per line than needed, and a turn of latency. Twisted's own issue #5303 ("Default transport
implementation doesn't write out bytes immediately") is open.

:func:`writeNow` sends the bytes at once when nothing is waiting before them, and hands what
the socket did not take to ``transport.write`` as before. Only a plain TCP connection
(Twisted's ``tcp.Connection``, TLS not started on it) qualifies; any other transport, TLS, a
registered producer or a connection closing gets ``transport.write`` unchanged.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def canWriteNow(transport: Any) -> bool:
    """Whether ``transport`` is a plain TCP connection with nothing queued to send: bytes
    written to its socket now go out in the order they were written. Read from the
    transport's own buffers; a Twisted without them (renamed in a later release) gets False,
    and every write goes through ``transport.write``."""
    return bool(
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and transport.producer is None
        and getattr(transport, "_writeDisconnected", None) is False
        and getattr(transport, "_tempDataBuffer", None) == []
        and getattr(transport, "dataBuffer", None) == b""
    )


def writeNow(transport: Any, data: bytes) -> None:
    """Write ``data`` to ``transport``: sent at once when :func:`canWriteNow`, what the socket
    does not take (all of it, on any error) left to ``transport.write``."""
    if data and canWriteNow(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # EAGAIN: no room; anything else: the reactor finds the connection lost when it
            # next reads or writes, as it would have without this.
            sent = 0
        if sent >= len(data):
            return
        data = data[sent:]
    transport.write(data)
