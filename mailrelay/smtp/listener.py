"""
One SMTP listener: its settings, its protocol factory, and the endpoint it listens on.

A listener is an endpoint string (``tcp:587``, ``systemd:domain=INET:index=0``, ...) plus a
security mode. ``tls`` listeners wrap the factory in TLS so the first byte is a handshake;
``starttls`` listeners hand the same context to the protocol for STARTTLS.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailrelay.auth.throttle import LoginThrottle
from mailrelay.config import LimitsConfig, ListenerConfig
from mailrelay.smtp.protocol import SubmissionProtocol
from mailrelay.smtp.sessions import SessionRegistry
from mailrelay.smtp.settings import ConnectionCounter, ListenerSettings

# The settings live in their own module (the protocol needs them, and this module needs the
# protocol); they are named here too, as part of what a listener is.
__all__ = [
    "ConnectionCounter",
    "ListenerSettings",
    "SubmissionFactory",
    "listenerFactory",
    "listenerSettings",
]


class SubmissionFactory(Factory):
    """Builds a :class:`SubmissionProtocol` per connection on one listener."""

    noisy = False  # no "Starting factory" lines at each (worker) start

    def __init__(self, settings: ListenerSettings, implicitTLS: bool = False) -> None:
        self.settings = settings
        self.implicitTLS = implicitTLS

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = SubmissionProtocol(self.settings, implicitTLS=self.implicitTLS)
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
    sessions: SessionRegistry | None = None,
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
        sessions=sessions,
    )


def listenerFactory(settings: ListenerSettings) -> IProtocolFactory:
    """The factory to listen with: TLS-wrapped for implicit-TLS listeners."""
    if settings.security == "tls":
        return TLSMemoryBIOFactory(
            settings.tlsContext, False, SubmissionFactory(settings, implicitTLS=True)
        )
    return SubmissionFactory(settings)
