"""
What every session on one SMTP listener shares: its :class:`ListenerSettings`, and the
:class:`ConnectionCounter` all listeners share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet.interfaces import IReactorTime

from mailrelay.auth.throttle import LoginThrottle
from mailrelay.config import LimitsConfig
from mailrelay.smtp.sessions import SessionRegistry


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
    # The process's open sessions, which a stop drains (mailrelay.smtp.sessions).
    sessions: SessionRegistry | None = None
