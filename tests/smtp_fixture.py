"""
A protocol under test: SubmissionProtocol on a StringTransport, with the real cred portal and
account avatar behind it. Time for timeouts comes from a ``task.Clock``.

:class:`MemoryProtocolHarness` puts the in-memory store of :mod:`mailrelay.testing` behind
them, and runs logins without threads: every reply is written before ``dataReceived``
returns (the protocol unit tests). :class:`ProtocolHarness` puts the real SQLite store and
Argon2 in a thread pool behind them, and waits for replies on the reactor.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.threadpool import ThreadPool

from mailrelay.auth.realm import makePortal
from mailrelay.auth.secrets import hashPassword, newApiKey
from mailrelay.auth.throttle import LoginThrottle
from mailrelay.config import Config, parseConfig
from mailrelay.model import Sender
from mailrelay.smtp.protocol import SubmissionProtocol
from mailrelay.smtp.settings import ListenerSettings
from mailrelay.store.sqlite import SQLiteStore
from mailrelay.submission import Submissions
from mailrelay.testing import (
    MemoryStore,
    SynchronousReactor,
    SynchronousThreadPool,
    cheapPasswordHash,
)

ACCOUNT = "acme"
PASSWORD = "correct horse battery"
PASSWORD_HASH = hashPassword(PASSWORD)  # once per test run: Argon2 is slow on purpose
SENDER_DOMAIN = "acme.example"
_FINAL_LINE = re.compile(rb"^\d{3}(?: |$)", re.MULTILINE)


def plain(user: str, password: str) -> str:
    """An AUTH PLAIN initial response."""
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


class TLSStringTransport(StringTransport):
    """A StringTransport that records startTLS instead of failing on it, and keeps ``events``:
    each write (its bytes), startTLS and loseConnection, in order."""

    tlsStarted: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[bytes | str] = []

    def write(self, data: bytes) -> None:
        self.events.append(data)
        super().write(data)

    def startTLS(self, context: Any) -> None:
        self.events.append("startTLS")
        self.tlsStarted = context

    def loseConnection(self) -> None:
        self.events.append("loseConnection")
        super().loseConnection()


class ProtocolHarness:
    """Builds protocols wired to a real store; use from a trial TestCase's setUp."""

    poll = True  # Sessions wait on the reactor for replies that come from other threads.
    passwordHash = PASSWORD_HASH

    def __init__(self, testCase: Any, limits: dict[str, Any] | None = None) -> None:
        self.testCase = testCase
        self.clock = Clock()
        self.config: Config = parseConfig({"hostname": "relay.test", "limits": limits or {}})
        path = Path(testCase.mktemp())
        path.mkdir(parents=True)
        self.store = SQLiteStore(path / "store.sqlite3", reactor)
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="test-auth")
        self.submissions = Submissions(self.store, self.config, reactor)
        self.portal, self.realm = makePortal(self.store, self.submissions, reactor, self.pool)
        self.throttle = LoginThrottle(self.clock.seconds)
        self.apiKey = ""

    @inlineCallbacks
    def start(self) -> Any:
        self.pool.start()
        self.testCase.addCleanup(self.pool.stop)
        yield self.store.open()
        self.testCase.addCleanup(self.store.close)
        yield self.store.addAccount(ACCOUNT, self.passwordHash)
        yield self.store.addSender(Sender(ACCOUNT, SENDER_DOMAIN, "domain"))
        keyId, self.apiKey, keyHash = newApiKey()
        yield self.store.addApiKey(ACCOUNT, keyId, keyHash)

    def settings(self, **overrides: Any) -> ListenerSettings:
        values: dict[str, Any] = dict(
            name="test",
            hostname="relay.test",
            security="none",
            authMode="required",
            allowPlaintextAuth=True,
            limits=self.config.limits,
            portal=self.portal,
            clock=self.clock,
            throttle=self.throttle,
            tlsContext=None,
            networkLogin=self.realm.networkLogin,
        )
        values.update(overrides)
        return ListenerSettings(**values)

    def connect(self, clientAddress: str = "192.0.2.7", **overrides: Any) -> Session:
        protocol = SubmissionProtocol(self.settings(**overrides))
        transport = TLSStringTransport(peerAddress=IPv4Address("TCP", clientAddress, 40000))
        protocol.makeConnection(transport)
        return Session(protocol, transport, self.poll)


class MemoryProtocolHarness(ProtocolHarness):
    """
    Builds protocols wired to the in-memory store, with the real portal (realm, checkers) and
    avatar: no threads, no files, no reactor. The account's password has a cheap Argon2 hash,
    verified at once on a :class:`~mailrelay.testing.SynchronousThreadPool`. ``clock`` tells
    the time to everything: protocol, store, avatar, realm, remembered passwords, throttle.
    """

    poll = False  # Every reply is written before dataReceived returns.
    passwordHash = cheapPasswordHash(PASSWORD)

    def __init__(self, testCase: Any, limits: dict[str, Any] | None = None) -> None:
        self.testCase = testCase
        self.clock = SynchronousReactor()
        self.clock.advance(1_735_689_600)  # 2025-01-01T00:00:00Z, so times look like times
        self.config = parseConfig({"hostname": "relay.test", "limits": limits or {}})
        self.store = MemoryStore(self.clock)
        self.pool = SynchronousThreadPool()
        self.submissions = Submissions(self.store, self.config, self.clock)
        self.portal, self.realm = makePortal(
            self.store,
            self.submissions,
            self.clock,
            self.pool,  # type: ignore[arg-type]
        )
        self.throttle = LoginThrottle(self.clock.seconds)
        self.apiKey = ""


class Session:
    """One client conversation: send lines, collect the replies they produce. With ``poll``
    False, replies must be written by the time ``send`` returns (nothing waits for them)."""

    def __init__(
        self, protocol: SubmissionProtocol, transport: TLSStringTransport, poll: bool = True
    ) -> None:
        self.protocol = protocol
        self.transport = transport
        self.poll = poll
        self.greeting = self.take()

    def take(self) -> list[str]:
        """All reply lines written so far (and forget them)."""
        data = self.transport.value()
        self.transport.clear()
        return [line.decode() for line in data.split(b"\r\n") if line]

    def finalCount(self) -> int:
        return len(_FINAL_LINE.findall(self.transport.value()))

    @inlineCallbacks
    def send(self, data: str | bytes, replies: int = 1, timeout: float = 10.0) -> Any:
        """Write ``data`` and wait for ``replies`` complete replies; returns their lines (a
        Deferred, fired already when the session does not poll)."""
        if isinstance(data, str):
            data = data.encode()
        self.protocol.dataReceived(data)
        waited = 0.0
        while self.finalCount() < replies and not self.transport.disconnecting:
            if waited > timeout or not self.poll:
                raise AssertionError(
                    f"waited for {replies} replies, got {self.transport.value()!r}"
                )
            yield deferLater(reactor, 0.002, lambda: None)
            waited += 0.002
        return self.take()

    @inlineCallbacks
    def command(self, line: str) -> Any:
        """Send one command line; return its final reply line."""
        lines = yield self.send(line + "\r\n")
        return lines[-1]

    @inlineCallbacks
    def login(self) -> Any:
        yield self.command("EHLO client.test")
        reply = yield self.command(f"AUTH PLAIN {plain(ACCOUNT, PASSWORD)}")
        assert reply.startswith("235 "), reply
