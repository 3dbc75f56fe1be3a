"""
Listeners behind HAProxy (``haproxy:`` endpoints): the PROXY protocol header, v1 or v2, is
read before the SMTP session starts.

Twisted's own wrapper (``twisted.protocols.haproxy``) starts the wrapped protocol at once and
only later, once the header has arrived, answers ``getPeer()`` with the client's address; a
session that reads its client's address when it starts (the connection limit per client,
relay by IP, the Received header, the mail log) would see HAProxy's. Here the session starts
once the header has been read, so it sees the client from its first moment. A connection
whose header does not arrive within ``HEADER_TIMEOUT`` seconds is aborted.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

HEADER_TIMEOUT = 30.0
"""Seconds a connection may take to send its PROXY header."""


class _Collect:
    """Stands in for the session while the header is parsed: keeps the bytes after it."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)


class HeaderFirstWrapper(HAProxyProtocolWrapper):
    """The PROXY-protocol wrapper whose wrapped protocol starts after the header."""

    _started = False
    _deadline: Any = None

    def makeConnection(self, transport: Any) -> None:
        # ProtocolWrapper.makeConnection without starting the wrapped protocol.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        clock = getattr(self.factory, "clock", None)
        if clock is not None:
            self._deadline = clock.callLater(HEADER_TIMEOUT, self._noHeader)

    def _noHeader(self) -> None:
        self._deadline = None
        if not self._started and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self._started:
            self.wrappedProtocol.dataReceived(data)
            return
        session, collected = self.wrappedProtocol, _Collect()
        self.wrappedProtocol = collected  # type: ignore[assignment]
        try:
            super().dataReceived(data)
        finally:
            self.wrappedProtocol = session
        if self._proxyInfo is None or self.disconnecting:
            return
        self._started = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        session.makeConnection(self)  # type: ignore[arg-type]  # (a wrapper is a transport)
        for chunk in collected.received:
            session.dataReceived(chunk)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        if self._started:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)


class ProxyHeaderFactory(HAProxyWrappingFactory):
    """Wraps an SMTP listener's factory for a ``haproxy:`` endpoint (see the module)."""

    protocol = HeaderFirstWrapper  # type: ignore[assignment]
    noisy = False

    def __init__(self, wrappedFactory: Any, clock: IReactorTime | None = None) -> None:
        super().__init__(wrappedFactory)
        self.clock = clock
