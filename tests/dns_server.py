"""
A real DNS server on loopback for tests: a twisted.names server on a free UDP and TCP port of
127.0.0.1 that answers from a dict the test gives and may change at any time::

    dns = await startDNSServer(self, {
        "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
        "nomail.test": {"MX": [(0, ".")]},             # null MX (RFC 7505)
        "_mta-sts.example.test": {"TXT": ["v=STSv1; id=1"]},
        "www.example.test": {"CNAME": "example.test"},
        "broken.test": SERVFAIL,                         # every query: SERVFAIL
        "half.test": {"A": ["127.0.0.2"], "AAAA": SERVFAIL},
        "silent.test": NO_ANSWER,                        # no reply at all (client times out)
    })
    resolver = makeResolver([dns.nameserver], reactor)   # dns.nameserver == "127.0.0.1:PORT"
    dns.records["mx1.example.test"] = {"A": ["127.0.0.2"]}  # takes effect on the next query

Names are matched without case and without a trailing dot. A name that is not in ``records``
answers NXDOMAIN; a name that is there without records of the asked type answers NOERROR with
no answer (NODATA). A CNAME is followed within ``records``. Record values: ``MX`` a list of
``(preference, exchange)`` (exchange ``"."`` is the root), ``A``/``AAAA`` a list of address
strings, ``TXT`` a list of strings (a tuple of strings for a record of several strings),
``CNAME`` one name. Answers carry TTL 0, so no resolver caches them.

The ports close when the test ends; ``dns.queries`` lists every ``(name, type)`` asked, e.g.
``("example.test", "MX")``, for tests that check what was (or was not) looked up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.names import dns
from twisted.names.server import DNSServerFactory
from twisted.trial.unittest import TestCase


class _Marker:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


SERVFAIL = _Marker("SERVFAIL")
"""A name (or one record type of a name) that answers SERVFAIL."""

NO_ANSWER = _Marker("NO_ANSWER")
"""A name (or one record type of a name) whose queries get no reply at all."""

Records = dict[str, Any]

globalReactor: Any = _reactor

_TYPES = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "TXT": dns.TXT, "CNAME": dns.CNAME}
_TYPE_NAMES = {number: name for name, number in _TYPES.items()}


@dataclass
class DNSServer:
    """A running server: ``nameserver`` is ``"127.0.0.1:PORT"`` (UDP and TCP), ``records``
    the live data it answers from, ``queries`` what it was asked."""

    port: int
    records: Records
    queries: list[tuple[str, str]] = field(default_factory=list)

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"


def startDNSServer(testCase: TestCase, records: Mapping[str, Any]) -> Deferred[DNSServer]:
    """Start a server answering from a copy of ``records`` (keys lower-cased), stopped when
    ``testCase`` ends. A Deferred so that it can grow asynchronous set-up without changing
    its callers (``await`` or ``yield`` it)."""
    server = DNSServer(port=0, records={_key(name): value for name, value in records.items()})
    factory = _Factory(server)
    # UDP and TCP on the same number, as resolvers expect (TCP after a truncated answer);
    # the free UDP port may be taken for TCP, so try a few.
    for _attempt in range(20):
        udp = globalReactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        port = udp.getHost().port
        try:
            tcp = globalReactor.listenTCP(port, factory, interface="127.0.0.1")
        except CannotListenError:
            udp.stopListening()
            continue
        testCase.addCleanup(udp.stopListening)
        testCase.addCleanup(tcp.stopListening)
        server.port = port
        return succeed(server)
    raise CannotListenError("127.0.0.1", 0, OSError("no port free for both UDP and TCP"))


def _key(name: str) -> str:
    return name.rstrip(".").lower()


def _name(name: str) -> bytes:
    return b"" if name in (".", "") else name.rstrip(".").encode("idna")


def _record(kind: str, value: Any) -> Any:
    if kind == "A":
        return dns.Record_A(value, ttl=0)
    if kind == "AAAA":
        return dns.Record_AAAA(value, ttl=0)
    if kind == "MX":
        preference, exchange = value
        return dns.Record_MX(preference, _name(exchange), ttl=0)
    if kind == "TXT":
        strings = (value,) if isinstance(value, str | bytes) else tuple(value)
        return dns.Record_TXT(
            *(one.encode() if isinstance(one, str) else one for one in strings), ttl=0
        )
    raise ValueError(f"unknown record type {kind!r}")


class _Factory(DNSServerFactory):
    def __init__(self, server: DNSServer) -> None:
        super().__init__(authorities=[], verbose=0)
        self._server = server

    def handleQuery(self, message: dns.Message, protocol: Any, address: Any) -> None:
        query = message.queries[0]
        name = query.name.name.decode("ascii", "replace")
        self._server.queries.append((_key(name), _TYPE_NAMES.get(query.type, str(query.type))))
        rCode, answers = self._answer(name, query.type)
        if rCode is NO_ANSWER:
            return
        response = dns.Message(
            id=message.id,
            answer=True,
            opCode=message.opCode,
            recDes=message.recDes,
            recAv=1,
            auth=True,
            rCode=rCode,
        )
        response.queries = message.queries
        response.answers = answers
        if address is None:
            protocol.writeMessage(response)
        else:
            protocol.writeMessage(response, address)

    def _answer(self, name: str, kind: int) -> tuple[Any, list[dns.RRHeader]]:
        answers: list[dns.RRHeader] = []
        for _hop in range(8):
            entry = self._server.records.get(_key(name))
            if entry is None:
                return dns.ENAME, answers
            if entry is SERVFAIL or entry is NO_ANSWER:
                return (dns.ESERVER if entry is SERVFAIL else NO_ANSWER), []
            target = entry.get("CNAME")
            if target is not None and kind != dns.CNAME:
                answers.append(
                    dns.RRHeader(
                        name, dns.CNAME, ttl=0, auth=True, payload=dns.Record_CNAME(target, ttl=0)
                    )
                )
                name = target
                continue
            values = entry.get(_TYPE_NAMES.get(kind, ""), [])
            if values is SERVFAIL or values is NO_ANSWER:
                return (dns.ESERVER if values is SERVFAIL else NO_ANSWER), []
            if isinstance(values, str):
                values = [values]
            for value in values:
                payload = (
                    dns.Record_CNAME(value, ttl=0)
                    if kind == dns.CNAME
                    else _record(_TYPE_NAMES[kind], value)
                )
                answers.append(dns.RRHeader(name, kind, ttl=0, auth=True, payload=payload))
            return dns.OK, answers
        return dns.ESERVER, []
