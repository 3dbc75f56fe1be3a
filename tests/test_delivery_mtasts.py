"""
MTA-STS policies fetched for real: a loopback DNS server (tests/dns_server.py) answers the
``_mta-sts`` TXT and policy host records, a twisted.web HTTPS server with a trustme
certificate serves the policy, and the SSRF-safe agent fetches it. Cache time comes from a
``task.Clock``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trustme
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.error import DNSLookupError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import BrowserLikePolicyForHTTPS, readBody
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from mailrelay.delivery.route import Candidate, TLSPolicy
from mailrelay.delivery.smtp.mtasts import (
    MAX_POLICY_BYTES,
    MTASTSPolicies,
    MTASTSPolicy,
    PolicyError,
    parsePolicy,
    parseTXT,
    tlsFor,
)
from mailrelay.delivery.smtp.mx import makeResolver
from mailrelay.delivery.smtp.safeagent import safeAgent
from mailrelay.netaddress import AddressPolicy
from tests.dns_server import DNSServer, startDNSServer

CA = trustme.CA()
SERVER_CERT = CA.issue_cert("mta-sts.example.test", "mta-sts.other.test", "127.0.0.1")
OTHER_CA = trustme.CA()

ENFORCE = (
    b"version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\nmx: *.mail.example.test\r\n"
    b"max_age: 86400\r\n"
)
TESTING = b"version: STSv1\nmode: testing\nmx: mx.example.test\nmax_age: 600\n"
LOOPBACK = AddressPolicy(["127.0.0.0/8"])


@dataclass
class PolicyServer:
    """What the HTTPS server answers for /.well-known/mta-sts.txt, and what it was asked."""

    body: bytes = ENFORCE
    code: int = 200
    contentType: bytes = b"text/plain"
    headers: dict[bytes, bytes] = field(default_factory=dict)
    hang: bool = False  # never answer
    requests: list[bytes] = field(default_factory=list)  # Host headers
    requested: Deferred[None] | None = None


class _PolicyResource(Resource):
    isLeaf = True

    def __init__(self, server: PolicyServer) -> None:
        super().__init__()
        self.policyServer = server

    def render_GET(self, request: Any) -> Any:
        server = self.policyServer
        server.requests.append(request.getHeader(b"host"))
        requested = server.requested
        if requested is not None:
            server.requested = None
            requested.callback(None)
        if request.path != b"/.well-known/mta-sts.txt":
            request.setResponseCode(404)
            return b"not found"
        if server.hang:
            return NOT_DONE_YET
        request.setResponseCode(server.code)
        request.setHeader(b"content-type", server.contentType)
        for name, value in server.headers.items():
            request.setHeader(name, value)
        return server.body


def startPolicyServer(testCase: TestCase, server: PolicyServer, cert: Any = SERVER_CERT) -> int:
    """Serve ``server`` over HTTPS on a free loopback port; returns the port."""
    site = Site(_PolicyResource(server))
    options = ssl.PrivateCertificate.loadPEM(cert.private_key_and_cert_chain_pem.bytes()).options()
    port = reactor.listenSSL(0, site, options, interface="127.0.0.1")  # type: ignore[attr-defined]
    testCase.addCleanup(port.stopListening)
    return int(port.getHost().port)


def trusting(ca: trustme.CA = CA) -> BrowserLikePolicyForHTTPS:
    return BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(ca.cert_pem.bytes()))


def records(txt: str = "v=STSv1; id=abc", policyHost: str = "127.0.0.1") -> dict[str, Any]:
    return {
        "_mta-sts.example.test": {"TXT": [txt]},
        "mta-sts.example.test": {"A": [policyHost]},
    }


class MTASTSPoliciesTests(TestCase):
    async def policies(
        self,
        dnsRecords: dict[str, Any] | None = None,
        server: PolicyServer | None = None,
        addresses: AddressPolicy = LOOPBACK,
        cert: Any = SERVER_CERT,
        ca: trustme.CA = CA,
    ) -> tuple[MTASTSPolicies, DNSServer, PolicyServer, Clock]:
        server = server or PolicyServer()
        port = startPolicyServer(self, server, cert)
        dns = await startDNSServer(self, records() if dnsRecords is None else dnsRecords)
        resolver = makeResolver([dns.nameserver], reactor, timeout=(2,))
        agent = safeAgent(reactor, resolver, addresses, contextFactory=trusting(ca))
        clock = Clock()
        clock.advance(1_000_000)
        return MTASTSPolicies(resolver, agent, clock, httpsPort=port), dns, server, clock

    async def test_enforce(self) -> None:
        policies, _, server, _ = await self.policies()
        policy = await policies.policyFor("Example.Test.")
        self.assertEqual(
            policy,
            MTASTSPolicy(
                mode="enforce",
                mx=("mx1.example.test", "*.mail.example.test"),
                maxAge=86400,
                policyId="abc",
            ),
        )
        self.assertEqual(len(server.requests), 1)
        self.assertTrue(server.requests[0].startswith(b"mta-sts.example.test"))

    async def test_testing(self) -> None:
        policies, _, _, _ = await self.policies(server=PolicyServer(body=TESTING))
        policy = await policies.policyFor("example.test")
        assert policy is not None
        self.assertEqual(
            (policy.mode, policy.mx, policy.maxAge), ("testing", ("mx.example.test",), 600)
        )

    async def test_noTXT(self) -> None:
        """No ``_mta-sts`` record: no policy, and no HTTPS request."""
        policies, dns, server, _ = await self.policies(
            {"example.test": {"MX": [(10, "mx.example.test")]}}
        )
        self.assertIsNone(await policies.policyFor("example.test"))
        self.assertEqual(server.requests, [])
        self.assertIn(("_mta-sts.example.test", "TXT"), dns.queries)

    async def test_txtNotSTS(self) -> None:
        """TXT records that are not one valid ``v=STSv1`` record mean no policy."""
        for txt in (
            ["v=spf1 -all"],
            ["v=STSv1; id=a", "v=STSv1; id=b"],
            ["v=STSv1;"],
            ["v=STSv1; id=a-b"],
        ):
            policies, _, server, _ = await self.policies(
                {
                    "_mta-sts.example.test": {"TXT": txt},
                    "mta-sts.example.test": {"A": ["127.0.0.1"]},
                }
            )
            self.assertIsNone(await policies.policyFor("example.test"), txt)
            self.assertEqual(server.requests, [], txt)

    async def test_cachedForMaxAge(self) -> None:
        """A policy is fetched once and used until ``max_age`` passes; then it is fetched
        again."""
        policies, _, server, clock = await self.policies()
        first = await policies.policyFor("example.test")
        clock.advance(86399)
        self.assertEqual(await policies.policyFor("example.test"), first)
        self.assertEqual(len(server.requests), 1)
        clock.advance(1)
        self.assertEqual(await policies.policyFor("example.test"), first)
        self.assertEqual(len(server.requests), 2)

    async def test_idChangeRefetches(self) -> None:
        policies, dns, server, _ = await self.policies()
        await policies.policyFor("example.test")
        dns.records["_mta-sts.example.test"] = {"TXT": ["v=STSv1; id=def"]}
        server.body = TESTING
        policy = await policies.policyFor("example.test")
        assert policy is not None
        self.assertEqual((policy.mode, policy.policyId), ("testing", "def"))
        self.assertEqual(len(server.requests), 2)

    async def test_fetchFailureKeepsCached(self) -> None:
        """A new id whose policy cannot be fetched leaves the cached policy in force."""
        policies, dns, server, _ = await self.policies()
        cached = await policies.policyFor("example.test")
        dns.records["_mta-sts.example.test"] = {"TXT": ["v=STSv1; id=def"]}
        server.code = 500
        self.assertEqual(await policies.policyFor("example.test"), cached)
        server.code, server.body = 200, b"garbage"
        self.assertEqual(await policies.policyFor("example.test"), cached)

    async def test_txtGoneKeepsCached(self) -> None:
        """Removing (or stripping) the TXT record does not end a cached policy early
        (RFC 8461 §5.1); it ends when it expires."""
        policies, dns, _, clock = await self.policies()
        cached = await policies.policyFor("example.test")
        del dns.records["_mta-sts.example.test"]
        self.assertEqual(await policies.policyFor("example.test"), cached)
        clock.advance(86400)
        self.assertIsNone(await policies.policyFor("example.test"))

    async def test_malformed(self) -> None:
        """A policy that is not RFC 8461's syntax, or not served as it requires, is no
        policy."""
        for server in (
            PolicyServer(body=b"version: STSv1\nmode: enforce\nmax_age: 600\n"),  # no mx
            PolicyServer(body=b"version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 600\n"),
            PolicyServer(body=b"version: STSv1\nmode: strict\nmx: a.test\nmax_age: 600\n"),
            PolicyServer(body=b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n"),
            PolicyServer(body=b"version: STSv1\nmode: enforce\nmx: a.test\n"),
            PolicyServer(body=b"<html>hello</html>"),
            PolicyServer(body=b"\xff\xfe"),
            PolicyServer(contentType=b"text/html"),
            PolicyServer(code=404),
            PolicyServer(code=301, headers={b"location": b"/.well-known/mta-sts.txt?again"}),
        ):
            policies, _, _, _ = await self.policies(server=server)
            self.assertIsNone(await policies.policyFor("example.test"), server)
            self.assertEqual(len(server.requests), 1, "no redirect followed")

    async def test_sizeCap(self) -> None:
        """A policy of up to 64 KiB is read; a longer one is no policy."""
        padding = b"x-padding: " + b"y" * 100 + b"\n"
        body = ENFORCE + padding * ((MAX_POLICY_BYTES - len(ENFORCE)) // len(padding))
        body += b"x-pad: " + b"z" * (MAX_POLICY_BYTES - len(body) - 8) + b"\n"
        self.assertEqual(len(body), MAX_POLICY_BYTES)
        policies, _, _, _ = await self.policies(server=PolicyServer(body=body))
        self.assertIsNotNone(await policies.policyFor("example.test"))
        policies, _, _, _ = await self.policies(server=PolicyServer(body=body + b"\n"))
        self.assertIsNone(await policies.policyFor("example.test"))

    async def test_policyHostNonPublic(self) -> None:
        """A policy host resolving into the relay's own networks gets no connection."""
        policies, _, server, _ = await self.policies(records(policyHost="10.0.0.1"))
        self.assertIsNone(await policies.policyFor("example.test"))
        policies, _, server, _ = await self.policies(addresses=AddressPolicy())
        self.assertIsNone(await policies.policyFor("example.test"))
        self.assertEqual(server.requests, [])

    async def test_untrustedCertificate(self) -> None:
        policies, _, server, _ = await self.policies(ca=OTHER_CA)
        self.assertIsNone(await policies.policyFor("example.test"))
        self.assertEqual(server.requests, [])

    async def test_certificateForAnotherName(self) -> None:
        policies, _, _, _ = await self.policies(cert=CA.issue_cert("mta-sts.other.test"))
        self.assertIsNone(await policies.policyFor("example.test"))

    async def test_timeout(self) -> None:
        """A policy server that does not answer within 15 s gives no policy, and its
        connection is dropped."""
        server = PolicyServer(hang=True)
        requested: Deferred[None] = Deferred()
        server.requested = requested
        policies, _, _, clock = await self.policies(server=server)
        result = policies.policyFor("example.test")
        await requested
        self.assertNoResult(result)
        clock.advance(15)
        self.assertIsNone(await result)

    async def test_concurrentCallsShareOneFetch(self) -> None:
        policies, _, server, _ = await self.policies()
        first, second = policies.policyFor("example.test"), policies.policyFor("example.test")
        self.assertEqual(await first, await second)
        self.assertEqual(len(server.requests), 1)


class SafeAgentTests(TestCase):
    async def get(
        self, url: str, addresses: AddressPolicy, dnsRecords: dict[str, Any], **kwargs: Any
    ) -> bytes:
        dns = await startDNSServer(self, dnsRecords)
        resolver = makeResolver([dns.nameserver], reactor, timeout=(2,))
        agent = safeAgent(reactor, resolver, addresses, contextFactory=trusting(), **kwargs)
        response = await agent.request(b"GET", url.encode())
        return await readBody(response)

    async def test_portOverride(self) -> None:
        """``portOverride`` sends every URL to one port: here the test's HTTPS server."""
        port = startPolicyServer(self, PolicyServer())
        body = await self.get(
            "https://mta-sts.example.test/.well-known/mta-sts.txt",
            LOOPBACK,
            records(),
            portOverride=port,
        )
        self.assertEqual(body, ENFORCE)

    async def test_onlyAllowedAddresses(self) -> None:
        """Of the addresses a name has, only allowed ones get a connection (10.0.0.1 would
        hang until the connect timeout)."""
        port = startPolicyServer(self, PolicyServer())
        body = await self.get(
            f"https://mta-sts.example.test:{port}/.well-known/mta-sts.txt",
            LOOPBACK,
            {"mta-sts.example.test": {"A": ["10.0.0.1", "127.0.0.1"], "AAAA": ["fd00::1"]}},
        )
        self.assertEqual(body, ENFORCE)

    async def test_literalRefused(self) -> None:
        """An IP literal in the URL is checked like a resolved address."""
        server = PolicyServer()
        port = startPolicyServer(self, server)
        for url in (f"https://127.0.0.1:{port}/", f"https://[::ffff:127.0.0.1]:{port}/"):
            with self.assertRaises(DNSLookupError):
                await self.get(url, AddressPolicy(), {})
        self.assertEqual(server.requests, [])

    async def test_literalAllowed(self) -> None:
        server = PolicyServer()
        port = startPolicyServer(self, server)
        body = await self.get(f"https://127.0.0.1:{port}/.well-known/mta-sts.txt", LOOPBACK, {})
        self.assertEqual(body, ENFORCE)

    async def test_nameRefused(self) -> None:
        server = PolicyServer()
        port = startPolicyServer(self, server)
        with self.assertRaises(DNSLookupError):
            await self.get(f"https://mta-sts.example.test:{port}/", AddressPolicy(), records())
        self.assertEqual(server.requests, [])


class ParseTests(SynchronousTestCase):
    def test_txt(self) -> None:
        self.assertEqual(parseTXT([b"v=STSv1; id=20160831085700Z;"]), "20160831085700Z")
        self.assertEqual(parseTXT([b"v=STSv1;", b" id=abc ; ext=1"]), "abc")
        for bad in (
            b"v=STSv1",
            b"id=abc; v=STSv1",
            b"v=STSv1; id=" + b"a" * 33,
            b"v=STSv1; id=a; id=b",
        ):
            self.assertRaises(PolicyError, parseTXT, [bad])

    def test_policy(self) -> None:
        self.assertEqual(
            parsePolicy(b"version: STSv1\nmode: none\nmax_age: 0\nfuture: 1\n", "x"),
            MTASTSPolicy("none", (), 0, "x"),
        )
        self.assertRaises(
            PolicyError,
            parsePolicy,
            b"version: STSv1\nmode: testing\nmx: a\nmax_age: 31557601\n",
            "x",
        )
        self.assertRaises(PolicyError, parsePolicy, b"version STSv1\n", "x")

    def test_allowsHost(self) -> None:
        """RFC 8461 §4.1: a wildcard stands for exactly one left-most label."""
        policy = MTASTSPolicy("enforce", ("mx1.example.test", "*.mail.example.test"), 1, "x")
        self.assertTrue(policy.allowsHost("mx1.example.test"))
        self.assertTrue(policy.allowsHost("MX1.Example.Test."))
        self.assertTrue(policy.allowsHost("a.mail.example.test"))
        self.assertFalse(policy.allowsHost("mail.example.test"))
        self.assertFalse(policy.allowsHost("a.b.mail.example.test"))
        self.assertFalse(policy.allowsHost("mx2.example.test"))
        self.assertFalse(policy.allowsHost("evilmx1.example.test"))

    def test_tlsFor(self) -> None:
        candidates = [
            Candidate("mx1.example.test", "192.0.0.9", 25),
            Candidate("backup.example.test", "192.0.0.10", 25),
        ]
        enforce = MTASTSPolicy("enforce", ("mx1.example.test",), 1, "x")
        self.assertEqual(tlsFor(enforce, candidates), (candidates[:1], TLSPolicy("verify")))
        testing = MTASTSPolicy("testing", ("mx1.example.test",), 1, "x")
        self.assertEqual(tlsFor(testing, candidates), (candidates, TLSPolicy("opportunistic")))
        self.assertEqual(tlsFor(None, candidates), (candidates, TLSPolicy("opportunistic")))
