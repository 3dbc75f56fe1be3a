"""
An HTTP agent for URLs that people outside the relay name (MTA-STS policy hosts, delivery
report callbacks): every address a host name resolves to is checked against an
:class:`~mailrelay.netaddress.AddressPolicy` when connecting, so neither an IP literal in the
URL nor a DNS answer that changes between a check and the connection (DNS rebinding) reaches
the relay's own networks. The check lives in the name resolution the connection uses, as in
Synapse's ``synapse/http/client.py``, not in a look at the URL string.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from twisted.internet import address as twaddress
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
    IResolver,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.names import dns
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from mailrelay.netaddress import AddressPolicy, IPAddress

log = Logger()

CONNECT_TIMEOUT = 15


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        # The lookups finish on their own (the resolver's timeouts); nothing to stop.
        pass


@implementer(IHostnameResolver)
class SafeNameResolver:
    """
    Resolves host names through a twisted.names ``resolver`` (A and AAAA) and passes on only
    the addresses ``addresses`` allows; an IP literal host is checked the same way. A name
    with no allowed address resolves to nothing, which a ``HostnameEndpoint`` reports as a
    DNSLookupError.
    """

    def __init__(self, resolver: IResolver, addresses: AddressPolicy) -> None:
        # Any: IResolver declares timeout required, twisted.names types no records.
        self._resolver: Any = resolver
        self._addresses = addresses

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[twaddress.IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        wanted = addressTypes or (twaddress.IPv4Address, twaddress.IPv6Address)
        d = self._addressesOf(hostName.strip("[]"))

        def deliver(found: list[IPAddress]) -> None:
            refused = [str(one) for one in found if not self._addresses.allows(one)]
            if refused:
                log.warn(
                    "Not connecting to {host}: refused non-public {refused}",
                    host=hostName,
                    refused=refused,
                )
            for one in found:
                if not self._addresses.allows(one):
                    continue
                if isinstance(one, ipaddress.IPv6Address):
                    if twaddress.IPv6Address in wanted:
                        resolutionReceiver.addressResolved(
                            twaddress.IPv6Address("TCP", str(one), portNumber)
                        )
                elif twaddress.IPv4Address in wanted:
                    resolutionReceiver.addressResolved(
                        twaddress.IPv4Address("TCP", str(one), portNumber)
                    )

        d.addCallback(deliver)
        d.addErrback(lambda failure: log.failure("Resolving {host}", failure, host=hostName))
        d.addBoth(lambda _: resolutionReceiver.resolutionComplete())
        return resolution

    def _addressesOf(self, host: str) -> Deferred[list[IPAddress]]:
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return succeed([literal])
        lookups = DeferredList(
            [
                self._resolver.lookupIPV6Address(host),
                self._resolver.lookupAddress(host),
            ],
            consumeErrors=True,
        )

        def collect(
            results: list[tuple[bool, Any]],
        ) -> list[IPAddress]:
            found: list[IPAddress] = []
            for ok, result in results:
                if not ok:
                    log.info("Resolving {host}: {error}", host=host, error=result.getErrorMessage())
                    continue
                for answer in result[0]:
                    if answer.type in (dns.A, dns.AAAA):
                        found.append(ipaddress.ip_address(answer.payload.address))
            return found

        return lookups.addCallback(collect)


@implementer(IReactorPluggableNameResolver)
class _SafeReactor:
    """The reactor, with name resolution through a :class:`SafeNameResolver`."""

    def __init__(self, reactor: Any, nameResolver: IHostnameResolver) -> None:
        self._reactor = reactor
        self.nameResolver = nameResolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        raise NotImplementedError("the safe reactor's name resolver is fixed")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


@implementer(IAgentEndpointFactory)
class _SafeEndpointFactory:
    def __init__(
        self, reactor: Any, contextFactory: IPolicyForHTTPS, portOverride: int | None
    ) -> None:
        self._reactor = reactor
        self._contextFactory = contextFactory
        self._portOverride = portOverride

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        port = self._portOverride or uri.port
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self._reactor, uri.host.decode("ascii"), port, timeout=CONNECT_TIMEOUT
        )
        if uri.scheme == b"https":
            creator = self._contextFactory.creatorForNetloc(uri.host, uri.port)
            return wrapClientTLS(creator, endpoint)
        if uri.scheme == b"http":
            return endpoint
        raise ValueError(f"unsupported URL scheme {uri.scheme!r}")


def safeAgent(
    reactor: Any,
    resolver: IResolver,
    addresses: AddressPolicy,
    contextFactory: IPolicyForHTTPS | None = None,
    portOverride: int | None = None,
) -> IAgent:
    """
    A ``twisted.web.client.Agent`` (no redirects followed, no persistent connections) whose
    connections go only to addresses ``addresses`` allows, host names resolved through
    ``resolver`` (A and AAAA). HTTPS certificates are verified by ``contextFactory`` (the
    system's trust roots when None). ``portOverride``, for tests, replaces every URL's port.
    """
    safeReactor = _SafeReactor(reactor, SafeNameResolver(resolver, addresses))
    factory = _SafeEndpointFactory(
        safeReactor, contextFactory or BrowserLikePolicyForHTTPS(), portOverride
    )
    return Agent.usingEndpointFactory(
        reactor, factory, pool=HTTPConnectionPool(reactor, persistent=False)
    )
