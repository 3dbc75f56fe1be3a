"""
Where mail for a recipient domain goes in mx mode (RFC 5321 §5.1): its MX hosts in preference
order, every address of each, as :class:`~mailrelay.delivery.route.Candidate` values; or why
there is nowhere to go (:class:`RouteError`), permanently or for now.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Sequence
from itertools import groupby
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import IResolver
from twisted.logger import Logger
from twisted.names import cache, client, dns, resolve
from twisted.names import error as dnserror
from twisted.names import hosts as hostsfile
from twisted.python.failure import Failure

from mailrelay.delivery.route import Candidate
from mailrelay.netaddress import AddressPolicy
from mailrelay.policy.addresses import literalAddress

log = Logger()

DNS_TIMEOUT: tuple[float, ...] = (2, 5, 10)
"""Seconds each try of a query waits for a reply before the next try: 17 s in all."""

_CNAME_HOPS = 8


class RouteError(Exception):
    """
    No candidate host for a domain. ``permanent`` is True when DNS says the domain takes no
    mail (null MX, NXDOMAIN, no usable address): the recipients fail (``CH_FAILED``); False
    when the answer may differ later (SERVFAIL, timeout): they are retried. ``reason`` is the
    text for the status trail.
    """

    def __init__(self, reason: str, permanent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent

    def __repr__(self) -> str:
        return f"RouteError({self.reason!r}, permanent={self.permanent})"


class _LookupFailed(Exception):
    """One DNS query that gave no answer; ``permanent`` for NXDOMAIN."""

    def __init__(self, what: str, permanent: bool) -> None:
        super().__init__(what)
        self.what = what
        self.permanent = permanent


def _describe(failure: Failure) -> tuple[str, bool]:
    """A DNS failure as (text, permanent)."""
    # Every rCode's error is a DomainError; a plain one is "not found" from a resolver that
    # has no answer of its own (ResolverChain, /etc/hosts).
    if failure.check(dnserror.DNSNameError, dnserror.AuthoritativeDomainError) or (
        failure.type is dnserror.DomainError
    ):
        return "the name does not exist (NXDOMAIN)", True
    if failure.check(dnserror.DNSServerError):
        return "the DNS server failed (SERVFAIL)", False
    if failure.check(dnserror.DNSQueryRefusedError):
        return "the DNS server refused the query", False
    if failure.check(dnserror.DNSQueryTimeoutError, TimeoutError, defer.TimeoutError):
        return "DNS timeout", False
    return f"DNS error: {failure.getErrorMessage() or failure.type}", False


class MXResolver:
    """
    Routes recipient domains through ``resolver`` (a twisted.names resolver, e.g. from
    :func:`makeResolver`), keeping only addresses ``addresses`` allows. ``shuffle`` orders
    MX hosts of equal preference (in place), injected so tests can fix the order.
    """

    def __init__(
        self,
        resolver: IResolver,
        addresses: AddressPolicy,
        port: int = 25,
        shuffle: Callable[[list[Any]], None] = random.shuffle,
    ) -> None:
        self._resolver = resolver
        self._addresses = addresses
        self._port = port
        self._shuffle = shuffle

    def route(self, domain: str) -> Deferred[list[Candidate]]:
        """
        The hosts to try for ``domain``, best first: each MX host (lower preference first,
        equal ones shuffled) with each of its addresses (AAAA, then A); with no MX records
        the domain itself (the implicit MX); for an address literal (``[192.0.2.1]``,
        ``[IPv6:2001:db8::1]``) that address. Fails with :class:`RouteError` when no address
        is left.
        """
        return ensureDeferred(self._route(domain))

    async def _route(self, domain: str) -> list[Candidate]:
        if domain.startswith("["):
            return self._literal(domain)
        name = domain.rstrip(".").lower()
        try:
            exchanges = await self._exchanges(name)
        except _LookupFailed as e:
            raise RouteError(f"{name}: MX lookup: {e.what}", e.permanent) from None
        if exchanges is None:
            hosts = [name]
        elif not exchanges:
            raise RouteError(f"{name}: null MX (RFC 7505): the domain accepts no mail", True)
        else:
            hosts = exchanges

        lookups = await DeferredList(
            [ensureDeferred(self._hostAddresses(host)) for host in hosts], consumeErrors=True
        )
        candidates: list[Candidate] = []
        seen: set[str] = set()
        refused: list[str] = []
        failures: list[_LookupFailed] = []
        for host, (_ok, result) in zip(hosts, lookups, strict=True):
            if isinstance(result, Failure):
                log.failure("{host}: address lookup", result, host=host)
                failures.append(_LookupFailed(f"{host}: {result.getErrorMessage()}", False))
                continue
            addresses, hostFailures = result
            failures += hostFailures
            for address in addresses:
                if not self._addresses.allows(address):
                    refused.append(f"{host} {address}")
                elif address not in seen:
                    # Two MX names for one server: one connection attempt is enough.
                    seen.add(address)
                    candidates.append(Candidate(host=host, address=address, port=self._port))
        if candidates:
            if refused:
                log.info(
                    "{domain}: not connecting to non-public {refused}",
                    domain=name,
                    refused=refused,
                )
            return candidates
        subject = "MX hosts" if exchanges else "no MX records, implicit MX"
        reasons = "; ".join(failure.what for failure in failures)
        if any(not failure.permanent for failure in failures):
            raise RouteError(f"{name}: {subject}: address lookup failed: {reasons}", False)
        if refused:
            raise RouteError(
                f"{name}: {subject}: only non-public addresses ({', '.join(refused)})", True
            )
        raise RouteError(
            f"{name}: {subject}: no address" + (f" ({reasons})" if reasons else ""), True
        )

    def _literal(self, domain: str) -> list[Candidate]:
        try:
            address = literalAddress(domain)
        except ValueError:
            raise RouteError(f"{domain}: not an address literal", True) from None
        if not self._addresses.allows(address):
            raise RouteError(f"{domain}: only non-public addresses", True)
        return [Candidate(host=str(address), address=str(address), port=self._port)]

    async def _exchanges(self, name: str) -> list[str] | None:
        """The MX host names of ``name`` by preference (None: it has no MX records; []: a
        null MX)."""
        target = name
        for _hop in range(_CNAME_HOPS):
            answers = await self._query(self._resolver.lookupMailExchange, target, "MX")
            records = [answer for answer in answers if answer.type == dns.MX]
            if records:
                break
            # A resolver that does not follow a CNAME itself: follow it here.
            aliases = [str(answer.payload.name) for answer in answers if answer.type == dns.CNAME]
            if not aliases:
                return None
            target = aliases[-1]
        else:
            raise _LookupFailed(f"CNAME chain longer than {_CNAME_HOPS}", False)

        exchanges = [
            (record.payload.preference, str(record.payload.name).rstrip(".").lower())
            for record in records
        ]
        # A null MX among other records is a misconfiguration (RFC 7505 §3); the others still
        # name hosts that may take the mail.
        usable = [(preference, host) for preference, host in exchanges if host]
        if not usable:
            return []
        usable.sort(key=lambda exchange: exchange[0])
        hosts: list[str] = []
        for _preference, group in groupby(usable, key=lambda exchange: exchange[0]):
            equal = [host for _, host in group]
            self._shuffle(equal)
            hosts += [host for host in equal if host not in hosts]
        return hosts

    async def _hostAddresses(self, host: str) -> tuple[list[str], list[_LookupFailed]]:
        """Every address of ``host`` (AAAA, then A) and the lookups that failed; both
        queries go out at once. A host that answered one query keeps those addresses: its
        failures count only when no host has a usable address."""
        results = await DeferredList(
            [
                ensureDeferred(self._addressesOf(self._resolver.lookupIPV6Address, host, "AAAA")),
                ensureDeferred(self._addressesOf(self._resolver.lookupAddress, host, "A")),
            ],
            consumeErrors=True,
        )
        addresses: list[str] = []
        failures: list[_LookupFailed] = []
        for _ok, result in results:
            if not isinstance(result, Failure):
                addresses += result
            elif result.check(_LookupFailed):
                failures.append(result.value)
            else:
                failures.append(_LookupFailed(f"{host}: {result.getErrorMessage()}", False))
        return addresses, failures

    async def _addressesOf(
        self, lookup: Callable[..., Deferred[Any]], host: str, kind: str
    ) -> list[str]:
        answers = await self._query(lookup, host, kind)
        wanted = dns.AAAA if kind == "AAAA" else dns.A
        # Records of the queried type are for ``host`` or for the CNAME chain's end.
        return [
            str(ipaddress.ip_address(answer.payload.address))
            for answer in answers
            if answer.type == wanted
        ]

    async def _query(self, lookup: Callable[..., Deferred[Any]], name: str, kind: str) -> list[Any]:
        """The answer records (payloads typed Any: twisted.names declares no record types)
        of ``lookup(name)``, or _LookupFailed."""
        try:
            answers, _authority, _additional = await lookup(name, None)
        except Exception:
            text, permanent = _describe(Failure())
            raise _LookupFailed(f"{name} {kind}: {text}", permanent) from None
        return list(answers)


def makeResolver(
    nameservers: Sequence[str], reactor: Any, timeout: Sequence[float] = DNS_TIMEOUT
) -> IResolver:
    """
    A twisted.names resolver asking ``nameservers`` (``"127.0.0.1:5353"``, ``"192.0.2.53"``,
    ``"[2001:db8::53]:53"``), each try waiting ``timeout`` seconds in turn; with no
    nameservers, the system's (/etc/resolv.conf, and /etc/hosts first). Raises ValueError for
    a nameserver that does not parse.
    """
    if not nameservers:
        # client.createResolver's chain, with this reactor and these timeouts.
        return resolve.ResolverChain(
            [
                hostsfile.Resolver(b"/etc/hosts"),
                cache.CacheResolver(reactor=reactor),
                client.Resolver(b"/etc/resolv.conf", reactor=reactor, timeout=tuple(timeout)),
            ]
        )
    return client.Resolver(
        servers=[_hostPort(server) for server in nameservers],
        reactor=reactor,
        timeout=tuple(timeout),
    )


def _hostPort(server: str) -> tuple[str, int]:
    host, port = server, "53"
    if server.startswith("["):
        host, _, rest = server[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"nameserver {server!r}: expected [address]:port")
            port = rest[1:]
    elif server.count(":") == 1:
        host, port = server.split(":")
    if not port.isdecimal() or not 0 < int(port) < 65536:
        raise ValueError(f"nameserver {server!r}: expected address or address:port")
    # twisted.names sends to an IP address; a name here would need a resolver of its own.
    return str(ipaddress.ip_address(host)), int(port)
