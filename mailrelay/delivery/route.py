"""
Where a delivery goes: the values the router hands to the SMTP client.

A *destination* is what connections are pooled and counted by (``smarthost``, or a recipient
domain in mx mode); its *candidates* are the hosts to try, in order, each with the address to
connect to; its :class:`TLSPolicy` says what TLS the connection must have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TLSMode = Literal["none", "opportunistic", "verify", "implicit"]
"""
- ``none``: never STARTTLS, even when offered;
- ``opportunistic``: STARTTLS when offered, certificate not checked; a host whose handshake
  fails is tried once more in clear;
- ``verify``: STARTTLS must be offered and the certificate must verify against the host's
  name (``Candidate.host``); otherwise the host is not used (no downgrade);
- ``implicit``: TLS from the first byte (port 465), verified as ``verify``.
"""


@dataclass(frozen=True)
class TLSPolicy:
    mode: TLSMode = "opportunistic"
    caFile: str | None = None  # PEM trust roots for verification; None: the system's


@dataclass(frozen=True)
class Candidate:
    """One host to try: ``host`` is its name (for the status text, SNI and certificate
    checks), ``address`` the IP address to connect to (None: resolve ``host`` when
    connecting, for the operator's own smarthost), ``port`` the TCP port."""

    host: str
    address: str | None
    port: int


@dataclass(frozen=True)
class Credentials:
    """AUTH for the smarthost."""

    username: str
    password: str = field(repr=False)
