"""
The web endpoint's parts without sockets: Basic header parsing, query and paging parameters,
remembered logins (how often Argon2 runs), the listener probe, health timeouts, and the JSON
body of unexpected failures.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web import server
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyChannel, DummyRequest
from zope.interface import implementer

from mailrelay.auth.throttle import LoginThrottle
from mailrelay.interfaces import ISubmission, StoreError
from mailrelay.model import Account, QueueStats
from mailrelay.web.auth import BasicLogin, Throttled, Unauthenticated, parseBasic
from mailrelay.web.health import QUEUE_STATS_MAX_AGE, Health, ListenerState, serviceListeners
from mailrelay.web.notifications import (
    BadQuery,
    idsAfter,
    pageCursor,
    pageLimit,
    recipientFilter,
)
from mailrelay.web.responses import JSONErrorRequest
from mailrelay.web.site import queryParameters


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


class ParseBasicTests(TestCase):
    def test_valid(self) -> None:
        self.assertEqual(parseBasic(basic("acme", "pw")), ("acme", "pw"))
        self.assertEqual(parseBasic(basic("acme", "a:b")), ("acme", "a:b"))
        self.assertEqual(parseBasic(basic("acme", "")), ("acme", ""))
        self.assertEqual(parseBasic(b"basic " + basic("x", "y")[6:]), ("x", "y"))
        self.assertEqual(parseBasic(basic("acme", "pässwörd")), ("acme", "pässwörd"))

    def test_invalid(self) -> None:
        for value in (
            None,
            b"",
            b"Basic",
            b"Basic !!",
            b"Basic " + base64.b64encode(b"nocolon"),
            b"Basic " + base64.b64encode(b":nouser"),
            b"Basic " + base64.b64encode(b"acme:\xff"),
            b"Digest username=acme",
        ):
            self.assertIsNone(parseBasic(value), value)


class ParameterTests(TestCase):
    def query(self, uri: bytes) -> dict[str, list[str]]:
        request = DummyRequest([])
        request.uri = uri
        return queryParameters(request)

    def test_queryKeepsPlus(self) -> None:
        self.assertEqual(
            self.query(b"/a?recipient=sms:+44%2012&x&recipient=2"),
            {"recipient": ["sms:+44 12", "2"], "x": [""]},
        )
        self.assertEqual(self.query(b"/a"), {})

    def test_queryNotUTF8(self) -> None:
        self.assertRaises(BadQuery, self.query, b"/a?recipient=email:%ff")

    def test_recipientFilter(self) -> None:
        self.assertIsNone(recipientFilter([]))
        self.assertEqual(recipientFilter(["email:a@b", "sms:1"]), "email:a@b")
        for bad in ("a@b", "EMAIL:a@b", "email:" + "a" * 400):
            self.assertRaises(BadQuery, recipientFilter, [bad])

    def test_pageLimit(self) -> None:
        self.assertEqual(pageLimit([]), 1000)
        self.assertEqual(pageLimit(["1"]), 1)
        for bad in ("0", "1001", "-1", "1.5", "", "\u0661"):
            self.assertRaises(BadQuery, pageLimit, [bad])

    def test_pageCursor(self) -> None:
        self.assertIsNone(pageCursor([]))
        self.assertEqual(pageCursor(["123"]), "123")
        for bad in ("", "x", "1" * 21, "\u0661\u0662"):
            self.assertRaises(BadQuery, pageCursor, [bad])

    def test_idsAfter(self) -> None:
        ids = ["10", "20", "30"]
        self.assertEqual(idsAfter(ids, None), ids)
        self.assertEqual(idsAfter(ids, "10"), ["20", "30"])
        self.assertEqual(idsAfter(ids, "30"), [])
        # The cursor's own notification expired meanwhile:
        self.assertEqual(idsAfter(ids, "15"), ["20", "30"])


@implementer(ICredentialsChecker)
class CountingChecker:
    """Accepts ``acme`` with the password held in ``passwords``; counts verifications."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, passwords: dict[str, str]) -> None:
        self.passwords = passwords
        self.checks = 0

    def requestAvatarId(self, credentials: Any) -> Deferred[str]:
        self.checks += 1
        name = credentials.username.decode()
        if self.passwords.get(name) == credentials.password.decode():
            return succeed(name)
        return fail(UnauthorizedLogin())


class Avatar:
    def __init__(self, account: Account) -> None:
        self.account = account


@implementer(IRealm)
class AccountsRealm:
    """Hands out avatars of the accounts in ``accounts`` (enabled ones only)."""

    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Deferred[Any]:
        account = self.accounts.get(avatarId)
        if account is None or not account.enabled:
            return fail(UnauthorizedLogin())
        return succeed((ISubmission, Avatar(account), lambda: None))


class BasicLoginThrottleTests(TestCase):
    """Failed Basic logins count against the client address, like SMTP AUTH failures."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.checker = CountingChecker({"acme": "pw"})
        self.realm = AccountsRealm()
        self.realm.accounts["acme"] = Account("acme", "hash-1")
        self.throttle = LoginThrottle(self.clock.seconds, maxFailures=2)
        self.login = BasicLogin(Portal(self.realm, [self.checker]), self.throttle)

    async def logIn(self, password: str = "pw") -> str:
        return await self.login.login(basic("acme", password), "192.0.2.1")

    async def test_realmRefuses(self) -> None:
        self.realm.accounts["acme"] = Account("acme", "hash-1", enabled=False)
        with self.assertRaises(Unauthenticated):
            await self.logIn()

    async def test_throttledBeforeChecking(self) -> None:
        for _ in range(2):
            with self.assertRaises(Unauthenticated):
                await self.logIn("wrong")
        with self.assertRaises(Throttled):
            await self.logIn()
        self.assertEqual(self.checker.checks, 2)
        # Another address is not affected.
        self.assertEqual(await self.login.login(basic("acme", "pw"), "192.0.2.2"), "acme")

    async def test_noCredentialsIsNoFailure(self) -> None:
        for _ in range(5):
            with self.assertRaises(Unauthenticated):
                await self.login.login(None, "192.0.2.1")
        self.assertFalse(self.throttle.blocked("192.0.2.1"))


class HangingStore:
    """A store whose ping never answers, and whose stats fail."""

    name = "sqlite"

    def ping(self) -> Deferred[float]:
        return Deferred()

    def stats(self) -> Deferred[Any]:
        return fail(StoreError("down"))


class HealthTests(TestCase):
    async def test_pingTimesOut(self) -> None:
        clock = Clock()
        health = Health(HangingStore(), clock, pingTimeout=2.0)  # type: ignore[arg-type]
        d = Deferred.fromCoroutine(health.healthz())
        self.assertNoResult(d)
        clock.advance(2.0)
        response = self.successResultOf(d)
        self.assertEqual(response.code, 503)
        self.assertEqual(json.loads(response.body)["store"]["ok"], False)

    def test_serviceListeners(self) -> None:
        root = MultiService()
        services = []
        for port in (2525, 2587, 8025):
            service = StreamServerEndpointService(TCP4ServerEndpoint(None, port), None)
            service.setServiceParent(root)
            services.append(service)
        probe = serviceListeners(root, ["tcp:2525", "tcp:2587"])
        services[0].running = 1
        self.assertEqual(
            list(probe()), [ListenerState("tcp:2525", True), ListenerState("tcp:2587", False)]
        )


class CountingStatsStore:
    """A store whose ping answers at once and whose queue counts answer when the test says."""

    name = "sqlite"

    def __init__(self) -> None:
        self.asked: list[Deferred[Any]] = []

    def ping(self) -> Deferred[float]:
        return succeed(0.001)

    def stats(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.asked.append(d)
        return d


class MetricsQueueCountTests(TestCase):
    def test_concurrentScrapesCountOnce(self) -> None:
        """Many /metrics requests at once (no credentials needed) cost one queue count."""
        clock = Clock()
        store = CountingStatsStore()
        health = Health(store, clock)  # type: ignore[arg-type]
        scrapes = [Deferred.fromCoroutine(health.metrics()) for _ in range(50)]
        self.assertEqual(len(store.asked), 1)
        store.asked[0].callback(QueueStats(queued=7, deferred=0, in_flight=0))
        depth = b'mailrelay_queue_depth{state="queued"} 7.0'
        for scrape in scrapes:
            self.assertIn(depth, self.successResultOf(scrape).body)
        clock.advance(QUEUE_STATS_MAX_AGE)
        Deferred.fromCoroutine(health.metrics())
        self.assertEqual(len(store.asked), 2)


class UnexpectedFailureTests(TestCase):
    def test_jsonBodyWithoutDetails(self) -> None:
        channel = DummyChannel()
        channel.site = server.Site(Resource())
        request = JSONErrorRequest(channel)
        request.method = b"GET"
        request.clientproto = b"HTTP/1.1"
        try:
            raise RuntimeError("/var/lib/mailrelay/secret.py")
        except RuntimeError:
            request.processingFailed(Failure())
        self.flushLoggedErrors(RuntimeError)
        written = channel.transport.written.getvalue()
        head, _, body = written.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 500 "))
        self.assertIn(b"Content-Type: application/json", head)
        self.assertEqual(json.loads(body), {"error": {"code": 500, "message": "internal error"}})
        self.assertNotIn(b"secret", written)
