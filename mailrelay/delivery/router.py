"""
Step two of a delivery: where each recipient goes.

In ``smarthost`` mode every recipient goes to the one endpoint the operator named; in ``mx``
mode each recipient domain is a destination of its own, found in the DNS (MX, then the
domain's own addresses) and held to the TLS its MTA-STS policy or the operator's
``[delivery.tls_policy]`` demands.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from twisted.internet.defer import Deferred, succeed

from mailrelay.config import ConfigError, DeliveryConfig
from mailrelay.delivery.route import Candidate, Credentials, TLSMode, TLSPolicy
from mailrelay.delivery.smtp.mtasts import MTASTSPolicies, tlsFor
from mailrelay.delivery.smtp.mx import MXResolver, RouteError
from mailrelay.model import Recipient


@dataclass(frozen=True)
class Route:
    """Where one group of recipients goes. ``final``: the hosts are the recipients' own MX,
    so their ``250`` means delivered (``CH_SENT``), not only handed on (``CH_RECEIVED``)."""

    destination: str
    candidates: tuple[Candidate, ...]
    tls: TLSPolicy
    credentials: Credentials | None = None
    final: bool = False


class Router(Protocol):
    def destinationOf(self, recipient: Recipient) -> str:
        """The destination key that recipients sharing one transaction have in common."""

    def route(self, destination: str) -> Deferred[Route]:
        """Where ``destination`` is reached; fails with RouteError when it cannot be."""


def recipientDomain(recipient: Recipient) -> str:
    """The domain of an e-mail recipient, lower-cased (an address literal as written)."""
    return recipient.address.rpartition("@")[2].lower()


SMARTHOST_TLS: dict[str, TLSMode] = {
    "required": "verify",
    "opportunistic": "opportunistic",
    "implicit": "implicit",
    "none": "none",
}
"""``smarthost_tls`` as the client's TLS modes: "required" means a verified certificate."""


class SmarthostRouter:
    """Every recipient to the operator's smarthost, in one transaction per message."""

    def __init__(self, config: DeliveryConfig) -> None:
        host, port = smarthostAddress(config.smarthost)
        self._route = Route(
            destination="smarthost",
            candidates=(Candidate(host=host, address=None, port=port),),
            tls=TLSPolicy(SMARTHOST_TLS[config.smarthost_tls], config.smarthost_ca_file),
            credentials=smarthostCredentials(config),
        )

    def destinationOf(self, recipient: Recipient) -> str:
        return self._route.destination

    def route(self, destination: str) -> Deferred[Route]:
        return succeed(self._route)


def smarthostAddress(endpoint: str) -> tuple[str, int]:
    """The host and port of a ``tcp:host=HOST:port=PORT`` endpoint string (``\\:`` escapes a
    colon, as in Twisted's endpoint strings: ``host=\\:\\:1``)."""
    fields = [f.replace("\\:", ":") for f in re.split(r"(?<!\\):", endpoint)]
    options = dict(f.partition("=")[::2] for f in fields[1:] if "=" in f)
    host, port = options.get("host", ""), options.get("port", "25")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"delivery.smarthost: not a tcp:host=HOST:port=PORT endpoint: {endpoint!r}"
        )
    return host, int(port)


def smarthostCredentials(config: DeliveryConfig) -> Credentials | None:
    """The smarthost login, its password read from ``smarthost_password_file`` (first line)."""
    if config.smarthost_username is None or config.smarthost_password_file is None:
        return None
    try:
        text = Path(config.smarthost_password_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"delivery.smarthost_password_file: cannot read it: {e}") from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise ConfigError("delivery.smarthost_password_file: the file is empty")
    return Credentials(config.smarthost_username, password)


class MXRouter:
    """Each recipient domain to its own MX hosts (SPEC §8.2)."""

    def __init__(
        self,
        resolver: MXResolver,
        policies: MTASTSPolicies | None,
        overrides: Mapping[str, TLSMode],
        caFile: str | None,
    ) -> None:
        self._resolver = resolver
        self._policies = policies
        self._overrides = {domain.lower().rstrip("."): mode for domain, mode in overrides.items()}
        self._caFile = caFile

    def destinationOf(self, recipient: Recipient) -> str:
        return recipientDomain(recipient)

    def route(self, destination: str) -> Deferred[Route]:
        return Deferred.fromCoroutine(self._route(destination))

    async def _route(self, domain: str) -> Route:
        candidates = await self._resolver.route(domain)
        override = self._overrides.get(domain)
        if override is not None:
            tls = TLSPolicy(override)
        elif self._policies is not None and not domain.startswith("["):
            policy = await self._policies.policyFor(domain)
            candidates, tls = tlsFor(policy, candidates)
            if not candidates:
                raise RouteError(
                    f"{domain}: no MX host matches its MTA-STS policy (enforce)", permanent=False
                )
        else:
            tls = TLSPolicy("opportunistic")
        return Route(
            destination=domain,
            candidates=tuple(candidates),
            tls=TLSPolicy(tls.mode, self._caFile),
            final=True,
        )
