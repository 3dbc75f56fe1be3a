"""Benchmark scenarios, named so a name says everything: ``2k-r1-c10-persist-plain``."""

from __future__ import annotations

import re
from dataclasses import dataclass

_LOAD = re.compile(r"^(\d+)k-r(\d+)-c(\d+)-(persist|1per)-(plain|starttls|tls)$")
_IDLE = re.compile(r"^idle(\d+)$")


@dataclass(frozen=True)
class Scenario:
    """A load scenario, or (``idle`` > 0) N idle sessions held open."""

    size_kib: int = 2
    rcpts: int = 1
    concurrency: int = 10
    persistent: bool = True  # False: one message per connection
    security: str = "plain"  # plain: no TLS, no AUTH (relay by IP); starttls/tls: AUTH PLAIN
    idle: int = 0

    @property
    def name(self) -> str:
        if self.idle:
            return f"idle{self.idle}"
        session = "persist" if self.persistent else "1per"
        return f"{self.size_kib}k-r{self.rcpts}-c{self.concurrency}-{session}-{self.security}"

    @classmethod
    def parse(cls, name: str) -> Scenario:
        """The scenario a name describes; ValueError for a name that is neither form."""
        if m := _IDLE.match(name):
            return cls(idle=int(m.group(1)))
        if m := _LOAD.match(name):
            size, rcpts, conc, session, security = m.groups()
            return cls(int(size), int(rcpts), int(conc), session == "persist", security)
        raise ValueError(
            f"bad scenario name {name!r}: want SIZEk-rRCPTS-cCONC-(persist|1per)-"
            "(plain|starttls|tls), e.g. 2k-r1-c10-persist-plain, or idleN, e.g. idle5000"
        )


# The full run: each line changes one thing against the first, so each cost shows on its own.
FULL = [
    Scenario.parse(n)
    for n in (
        "2k-r1-c10-persist-plain",  # the reference: small messages, relay by IP
        "100k-r1-c10-persist-plain",  # large messages
        "2k-r50-c10-persist-plain",  # many recipients
        "2k-r1-c500-persist-plain",  # many concurrent sessions
        "2k-r1-c10-1per-plain",  # a connection per message
        "2k-r1-c10-persist-starttls",  # AUTH PLAIN over STARTTLS
        "2k-r1-c10-persist-tls",  # AUTH PLAIN over implicit TLS
        "2k-r1-c10-1per-tls",  # a TLS handshake and AUTH per message
        "idle5000",  # memory per idle connection
    )
]

QUICK = [
    Scenario.parse(n) for n in ("2k-r1-c10-persist-plain", "2k-r1-c10-persist-starttls", "idle500")
]
