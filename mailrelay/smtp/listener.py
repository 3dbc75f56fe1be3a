"""
One SMTP listener: its settings, its protocol factory, and the endpoint it listens on.

A listener is an endpoint string (``tcp:587``, ``systemd:domain=INET:index=0``, ...) plus a
security mode. ``tls`` listeners wrap the factory in TLS so the first byte is a handshake;
``starttls`` listeners hand the same context to the protocol for STARTTLS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailrelay.auth.throttle import LoginThrottle
from mailrelay.config import LimitsConfig, ListenerConfig


class ConnectionCounter:
    """Open SMTP connections, in all and per client address, shared by every listener."""

    def __init__(
        self,
        maxTotal: int,
        maxPerClient: int,
        publish: Callable[[int], None] | None = None,
    ) -> None:
        self.maxTotal = maxTotal
        self.maxPerClient = maxPerClient
        self.total = 0
        self._perClient: dict[str, int] = {}
        # Told the new total at each change (the workers' shared load table).
        self._publish = publish

    def acquire(self, client: str) -> bool:
        """Count a new connection from ``client``; False (and not counted) if over a limit."""
        count = self._perClient.get(client, 0)
        if self.total >= self.maxTotal or count >= self.maxPerClient:
            return False
        self.total += 1
        self._perClient[client] = count + 1
        if self._publish is not None:
            self._publish(self.total)
        return True

    def release(self, client: str) -> None:
        """Forget a connection counted by :meth:`acquire`."""
        self.total -= 1
        if self._publish is not None:
            self._publish(self.total)
        count = self._perClient[client] - 1
        if count:
            self._perClient[client] = count
        else:
            del self._perClient[client]


@dataclass(frozen=True)
class ListenerSettings:
    """Everything a session on one listener needs to know, shared by all its connections."""

    name: str
    hostname: str
    security: str
    authMode: str
    allowPlaintextAuth: bool
    limits: LimitsConfig
    portal: Portal
    clock: IReactorTime
    throttle: LoginThrottle
    tlsContext: Any = None
    # For auth = "network": (session) -> Deferred[(avatar, logout) | None]
    networkLogin: Callable[[Any], Any] | None = None
    spoolDir: str | None = None
    # () -> Deferred firing once the store is open; sessions greet only then.
    whenReady: Callable[[], Any] | None = None
    connections: ConnectionCounter | None = None


class SubmissionFactory(Factory):
    """Builds a :class:`SubmissionProtocol` per connection on one listener."""

    noisy = False  # no "Starting factory" lines at each (worker) start

    def __init__(self, settings: ListenerSettings, implicitTLS: bool = False) -> None:
        # Imported here (protocol imports this module), and now rather than at the first
        # connection: a process that takes tens of milliseconds to import at its first accept
        # loses the start of a burst of connections to the other workers.
        from mailrelay.smtp.protocol import SubmissionProtocol

        self.settings = settings
        self.implicitTLS = implicitTLS
        self._protocol = SubmissionProtocol

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = self._protocol(self.settings, implicitTLS=self.implicitTLS)
        protocol.factory = self
        return protocol


def listenerSettings(
    listener: ListenerConfig,
    *,
    hostname: str,
    limits: LimitsConfig,
    portal: Portal,
    clock: IReactorTime,
    throttle: LoginThrottle,
    tlsContext: Any,
    networkLogin: Callable[[Any], Any] | None,
    spoolDir: str | None,
    whenReady: Callable[[], Any] | None = None,
    connections: ConnectionCounter | None = None,
) -> ListenerSettings:
    """The settings of one configured listener."""
    return ListenerSettings(
        name=listener.endpoint,
        hostname=hostname,
        security=listener.security,
        authMode=listener.auth,
        allowPlaintextAuth=listener.allow_plaintext_auth,
        limits=limits,
        portal=portal,
        clock=clock,
        throttle=throttle,
        tlsContext=tlsContext if listener.security != "none" else None,
        networkLogin=networkLogin if listener.auth == "network" else None,
        spoolDir=spoolDir,
        whenReady=whenReady,
        connections=connections,
    )


def listenerFactory(settings: ListenerSettings) -> IProtocolFactory:
    """The factory to listen with: TLS-wrapped for implicit-TLS listeners."""
    if settings.security == "tls":
        return TLSMemoryBIOFactory(
            settings.tlsContext, False, SubmissionFactory(settings, implicitTLS=True)
        )
    return SubmissionFactory(settings)
