"""
A minimal asyncio SMTP client protocol for load generation.

It parses only what a load generator needs: the 3-digit code of each complete reply (and, for
EHLO, the lines). Callers write pre-built byte blobs and ``await replies(n)``.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import cast

_DASH = ord("-")


class SMTPReplyError(Exception):
    """The server answered a session step (greeting, EHLO, STARTTLS, AUTH) with ``code``."""

    def __init__(self, step: str, code: int) -> None:
        super().__init__(f"{step}: {code}")
        self.step = step
        self.code = code


class ReplyCounter(asyncio.Protocol):
    """Collects reply codes as they complete; hands them out in order to one waiter."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.codes: list[int] = []
        self.lines: list[bytes] | None = None  # set to a list to also collect reply lines
        self.pipelining = False  # the session's choice, kept with its connection
        self._buf = b""
        self._want = 0
        self._waiter: asyncio.Future[list[int]] | None = None
        self._lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            # "250-..." continues a reply; "250 ..." or a bare "250" ends it.
            if end - start < 5 or buf[start + 3] != _DASH:
                self.codes.append(int(buf[start : start + 3]))
            if self.lines is not None:
                self.lines.append(buf[start:end].rstrip(b"\r"))
            start = end + 1
        self._buf = buf[start:]
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionResetError("connection closed by server")
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(self._lost)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and len(self.codes) >= self._want:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(self._take(self._want))

    def _take(self, n: int) -> list[int]:
        taken, self.codes = self.codes[:n], self.codes[n:]
        return taken

    def replies(self, n: int) -> asyncio.Future[list[int]]:
        """A future for the codes of the next ``n`` complete replies."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[int]] = loop.create_future()
        if len(self.codes) >= n:
            fut.set_result(self._take(n))
        elif self._lost is not None:
            fut.set_exception(self._lost)
        else:
            self._want = n
            self._waiter = fut
        return fut

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def client_tls_context() -> ssl.SSLContext:
    """TLS for loopback benchmarks: any certificate is accepted."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def expect(proto: ReplyCounter, step: str, code: int) -> None:
    """Wait for one reply and raise :class:`SMTPReplyError` unless it is ``code``."""
    (got,) = await proto.replies(1)
    if got != code:
        raise SMTPReplyError(step, got)


async def ehlo(proto: ReplyCounter, name: bytes = b"loadgen.bench.local") -> set[bytes]:
    """Send EHLO; return the advertised extension keywords (upper case)."""
    proto.lines = []
    proto.write(b"EHLO " + name + b"\r\n")
    await expect(proto, "EHLO", 250)
    lines, proto.lines = proto.lines, None
    return {line[4:].split(b" ", 1)[0].upper() for line in lines[1:]}
