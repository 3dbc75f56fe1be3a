"""Tests for mailrelay.sendnow: a write sent at once on a plain TCP connection."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as globalReactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailrelay.sendnow import canWriteNow, writeNow
from tests.smtp_sinks import SinkTLS

reactor: Any = globalReactor


class Collect(Protocol):
    """The receiving side: keeps what arrives; ``until(n)`` fires once n octets have."""

    def __init__(self) -> None:
        self.received = b""
        self._waiting: list[tuple[int, Deferred[bytes]]] = []
        self.connected_: Deferred[Collect] = Deferred()

    def connectionMade(self) -> None:
        self.connected_.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        ready = [(n, d) for n, d in self._waiting if len(self.received) >= n]
        self._waiting = [(n, d) for n, d in self._waiting if len(self.received) < n]
        for _, d in ready:
            d.callback(self.received)

    def until(self, octets: int) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        if len(self.received) >= octets:
            d.callback(self.received)
        else:
            self._waiting.append((octets, d))
        return d


class WriteNowTests(TestCase):
    """On real loopback connections."""

    @inlineCallbacks
    def connect(self) -> Any:
        """A connected pair: (the server side's TCP transport, the client's Collect)."""
        serverSide: Deferred[Protocol] = Deferred()

        class Accepting(Factory):
            def buildProtocol(self, addr: Any) -> Protocol:
                protocol = Protocol()
                reactor.callLater(0, serverSide.callback, protocol)
                return protocol

        port = reactor.listenTCP(0, Accepting(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        collect = Collect()
        factory = ClientFactory.forProtocol(lambda: collect)
        connector = reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
        self.addCleanup(connector.disconnect)
        server = yield serverSide
        yield collect.connected_
        self.addCleanup(server.transport.loseConnection)
        return server.transport, collect

    @inlineCallbacks
    def test_sentBeforeWriteReturns(self) -> Any:
        """Nothing is left for the reactor: no buffered bytes, no watch for writability."""
        transport, collect = yield self.connect()
        self.assertTrue(canWriteNow(transport))
        writeNow(transport, b"250 OK\r\n")
        self.assertEqual((transport.dataBuffer, transport._tempDataBuffer), (b"", []))
        self.assertNotIn(transport, reactor.getWriters())
        received = yield collect.until(8)
        self.assertEqual(received, b"250 OK\r\n")

    @inlineCallbacks
    def test_neverAheadOfWhatIsQueued(self) -> Any:
        transport, collect = yield self.connect()
        transport.write(b"first ")
        self.assertFalse(canWriteNow(transport))
        writeNow(transport, b"second")
        received = yield collect.until(12)
        self.assertEqual(received, b"first second")

    @inlineCallbacks
    def test_whatTheSocketDoesNotTakeIsQueued(self) -> Any:
        """More than the socket's buffers hold: the rest goes to the transport's buffer and
        arrives after, in order; and a later write waits behind it."""
        transport, collect = yield self.connect()
        big = bytes(range(256)) * (32 * 1024)  # 8 MiB
        writeNow(transport, big)
        self.assertTrue(transport._tempDataBuffer or transport.dataBuffer)
        writeNow(transport, b"end")
        received = yield collect.until(len(big) + 3)
        self.assertEqual(received, big + b"end")

    @inlineCallbacks
    def test_notOnceClosing(self) -> Any:
        transport, _ = yield self.connect()
        transport.loseConnection()
        self.assertFalse(canWriteNow(transport))
        writeNow(transport, b"late")  # what transport.write does with it: nothing
        self.assertEqual(transport.dataBuffer, b"")

    @inlineCallbacks
    def test_notUnderTLS(self) -> Any:
        """Once TLS starts on the connection, its bytes go through the TLS layer."""
        transport, _ = yield self.connect()
        transport.startTLS(SinkTLS().serverOptions())
        self.assertFalse(canWriteNow(transport))


class OtherTransportTests(SynchronousTestCase):
    def test_writtenAsBefore(self) -> None:
        transport = StringTransport()
        self.assertFalse(canWriteNow(transport))
        writeNow(transport, b"220 ready\r\n")
        self.assertEqual(transport.value(), b"220 ready\r\n")
