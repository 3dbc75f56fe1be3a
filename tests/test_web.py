"""
The web endpoint end to end: a real site listening on 127.0.0.1, a real HTTP client (treq), a
real SQLite store in the test's temp directory, real accounts logged in through the same portal
as SMTP, and notifications enqueued as the SMTP side enqueues them.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from mailrelay.auth.realm import makePortal
from mailrelay.auth.secrets import hashPassword, newApiKey
from mailrelay.auth.throttle import LoginThrottle
from mailrelay.config import parseConfig
from mailrelay.model import HeaderOptions, Notification, Recipient, StatusEvent
from mailrelay.store.sqlite import SQLiteStore
from mailrelay.submission import Submissions
from mailrelay.web import ListenerState, makeWebSite
from mailrelay.web.responses import MAX_REQUEST_BODY

PASSWORD = "correct horse battery staple"
PASSWORD_HASH = hashPassword(PASSWORD)  # once: Argon2 is slow by design
OTHER_PASSWORD = "another secret"
OTHER_HASH = hashPassword(OTHER_PASSWORD)

T0 = datetime(2015, 3, 8, 14, 58, 30, 252000, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)
ALICE = Recipient("name1@customer.com", "email")
TAGGED = Recipient("info+news@customer.com", "email")
PHONE = Recipient("+4477331234567", "sms")
MAX_FAILURES = 3


def basic(user: str, password: str) -> bytes:
    """An Authorization header value."""
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


class WebSiteTestsBase(TestCase):
    """A listening site over a populated store, and a client to ask it."""

    async def setUp(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        self.store = SQLiteStore(directory / "mailrelay.sqlite3", reactor)
        await self.store.open()
        self.addCleanup(self.store.close)
        authPool = ThreadPool(minthreads=1, maxthreads=2, name="test-auth")
        authPool.start()
        self.addCleanup(authPool.stop)

        self.config = parseConfig({"hostname": "relay.test", "limits": {}})
        submissions = Submissions(self.store, self.config, reactor)
        self.clock = Clock()
        self.clock.advance(NOW.timestamp())
        portal, _ = makePortal(self.store, submissions, reactor, authPool, clock=self.clock)
        self.passwords = portal.checkers[IUsernamePassword]  # counts Argon2 verifications
        self.throttle = LoginThrottle(self.clock.seconds, maxFailures=MAX_FAILURES, window=300)
        self.listeners = [ListenerState("tcp:587", True)]
        site = makeWebSite(
            self.store,
            portal,
            self.throttle,
            self.config,
            self.clock,
            listenersUp=lambda: self.listeners,
        )
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"

        connections = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(connections.closeCachedConnections)
        self.client = HTTPClient(Agent(reactor, pool=connections))

        for name in ("acme", "globex", "initech"):
            await self.store.addAccount(name, PASSWORD_HASH)
        await self.changeAccount("initech", enabled=False)
        await self.store.addAccount("netco", PASSWORD_HASH)
        await self.changeAccount("netco", networks=("10.0.0.0/8",))
        keyId, self.apiKey, keyHash = newApiKey()
        await self.store.addApiKey("acme", keyId, keyHash)

    async def changeAccount(self, name: str, **changes: Any) -> None:
        account = await self.store.getAccount(name)
        assert account is not None
        await self.store.updateAccount(dataclasses.replace(account, **changes))

    async def enqueue(
        self,
        account: str = "acme",
        recipients: tuple[Recipient, ...] = (ALICE, PHONE),
        receivedAt: datetime = T0,
        bulkId: str | None = None,
    ) -> str:
        """A notification stored as the SMTP side stores one; returns its id."""
        notification = Notification(
            notification_id=self.store.nextNotificationId(),
            account=account,
            sender="app@acme.example",
            recipients=recipients,
            size=42,
            received_at=receivedAt,
            options=HeaderOptions(bulk_id=bulkId),
        )
        await self.store.enqueue(notification, b"Subject: hi\r\n\r\nhello\r\n")
        return notification.notification_id

    async def get(
        self,
        path: str,
        auth: tuple[str, str] | None = ("acme", PASSWORD),
        method: str = "GET",
        authorization: bytes | None = None,
    ) -> tuple[Any, bytes]:
        """``(response, body)`` of one request; ``auth`` goes as HTTP Basic credentials."""
        headers = {}
        if authorization is not None:
            headers[b"Authorization"] = [authorization]
        elif auth is not None:
            headers[b"Authorization"] = [basic(*auth)]
        response = await self.client.request(method, self.base + path, headers=headers)
        body = await response.content()
        return response, body

    async def getJSON(self, path: str, expectedCode: int = 200, **kwargs: Any) -> Any:
        """The JSON body of a request that must answer ``expectedCode`` with JSON."""
        response, body = await self.get(path, **kwargs)
        self.assertEqual(response.code, expectedCode, body)
        self.assertEqual(header(response, "Content-Type"), "application/json")
        self.assertEqual(header(response, "X-Content-Type-Options"), "nosniff")
        return json.loads(body)

    def assertError(self, document: Any, code: int) -> None:
        """``document`` is the generic error body of ``code``: no detail beyond a message."""
        self.assertEqual(set(document), {"error"})
        self.assertEqual(set(document["error"]), {"code", "message"})
        self.assertEqual(document["error"]["code"], code)
        message = document["error"]["message"]
        for leak in ("Traceback", "/", ".py", "Error"):
            self.assertNotIn(leak, message)


def header(response: Any, name: str) -> str | None:
    """The one value of a response header, or None."""
    values = response.headers.getRawHeaders(name)
    if values is None:
        return None
    assert len(values) == 1, values
    return str(values[0])


def emptyDocument(notificationId: str) -> dict[str, Any]:
    return {"SAPnotification": {"notificationId": notificationId, "status": []}}


class NotificationStatusTests(WebSiteTestsBase):
    """``GET /{accountId}/notifications/id/{notificationId}``."""

    async def test_receivedEvents(self) -> None:
        nid = await self.enqueue()
        document = await self.getJSON(f"/acme/notifications/id/{nid}")
        received = {
            "statusCode": "CAAS_RECEIVED",
            "statusText": "Successful",
            "timestamp": "2015-03-08 14:58:30.252",
        }
        self.assertEqual(
            document,
            {
                "SAPnotification": {
                    "notificationId": nid,
                    "status": [
                        {**received, "channel": "email", "recipient": "email:name1@customer.com"},
                        {**received, "channel": "sms", "recipient": "sms:+4477331234567"},
                    ],
                }
            },
        )

    async def test_eventsOldestFirst(self) -> None:
        nid = await self.enqueue(recipients=(ALICE,))

        def event(code: str, text: str, seconds: float) -> StatusEvent:
            return StatusEvent(nid, ALICE, code, text, T0 + timedelta(seconds=seconds))

        # Stored out of order: the answer is in time order all the same.
        await self.store.addEvents([event("CH_SENT", "Successful", 3.5)])
        await self.store.addEvents(
            [
                event("CAAS_SENT", "Successful", 1.001),
                event("CH_DEFERRED", "451 4.7.1 try later", 2),
            ]
        )
        document = await self.getJSON(f"/acme/notifications/id/{nid}")
        status = document["SAPnotification"]["status"]
        self.assertEqual(
            [(s["statusCode"], s["statusText"], s["timestamp"]) for s in status],
            [
                ("CAAS_RECEIVED", "Successful", "2015-03-08 14:58:30.252"),
                ("CAAS_SENT", "Successful", "2015-03-08 14:58:31.253"),
                ("CH_DEFERRED", "451 4.7.1 try later", "2015-03-08 14:58:32.252"),
                ("CH_SENT", "Successful", "2015-03-08 14:58:33.752"),
            ],
        )

    async def test_recipientFilterEmail(self) -> None:
        nid = await self.enqueue(recipients=(ALICE, TAGGED, PHONE))
        for query in ("email:name1@customer.com", "email:NAME1@Customer.com"):
            document = await self.getJSON(f"/acme/notifications/id/{nid}?recipient={query}")
            recipients = [s["recipient"] for s in document["SAPnotification"]["status"]]
            self.assertEqual(recipients, ["email:name1@customer.com"], query)

    async def test_recipientFilterPlusIsLiteral(self) -> None:
        """``+`` in the query is the address's plus, as typed; ``%2B`` means the same."""
        nid = await self.enqueue(recipients=(ALICE, TAGGED, PHONE))
        for query in ("email:info+news@customer.com", "email:info%2Bnews%40customer.com"):
            document = await self.getJSON(f"/acme/notifications/id/{nid}?recipient={query}")
            recipients = [s["recipient"] for s in document["SAPnotification"]["status"]]
            self.assertEqual(recipients, ["email:info+news@customer.com"], query)

    async def test_recipientFilterSMS(self) -> None:
        nid = await self.enqueue(recipients=(ALICE, TAGGED, PHONE))
        for query in ("sms:+4477331234567", "sms:%2B4477331234567", "sms:004477331234567"):
            document = await self.getJSON(f"/acme/notifications/id/{nid}?recipient={query}")
            status = document["SAPnotification"]["status"]
            self.assertEqual([s["recipient"] for s in status], ["sms:+4477331234567"], query)
            self.assertEqual(status[0]["channel"], "sms")

    async def test_recipientFilterNoMatch(self) -> None:
        nid = await self.enqueue()
        document = await self.getJSON(
            f"/acme/notifications/id/{nid}?recipient=email:someone@else.example"
        )
        self.assertEqual(document, emptyDocument(nid))

    async def test_recipientFilterMalformed(self) -> None:
        nid = await self.enqueue()
        for query in ("name1@customer.com", "fax:123", "email:%ff"):
            document = await self.getJSON(
                f"/acme/notifications/id/{nid}?recipient={query}", expectedCode=400
            )
            self.assertError(document, 400)

    async def test_unknownId(self) -> None:
        for nid in ("100000009020772", "not-a-number", "99999999999999999999999", "9" * 5000):
            document = await self.getJSON(f"/acme/notifications/id/{nid}")
            self.assertEqual(document, emptyDocument(nid))

    async def test_foreignIdLooksUnknown(self) -> None:
        nid = await self.enqueue(account="globex")
        document = await self.getJSON(f"/acme/notifications/id/{nid}")
        self.assertEqual(document, emptyDocument(nid))
        # ... while its owner sees it.
        document = await self.getJSON(f"/globex/notifications/id/{nid}", auth=("globex", PASSWORD))
        self.assertEqual(len(document["SAPnotification"]["status"]), 2)

    async def test_expiredIdLooksUnknown(self) -> None:
        retention = timedelta(days=self.config.limits.status_retention_days)
        expired = await self.enqueue(receivedAt=NOW - retention - timedelta(milliseconds=1))
        kept = await self.enqueue(receivedAt=NOW - retention)
        self.assertEqual(
            await self.getJSON(f"/acme/notifications/id/{expired}"), emptyDocument(expired)
        )
        document = await self.getJSON(f"/acme/notifications/id/{kept}")
        self.assertEqual(len(document["SAPnotification"]["status"]), 2)

    async def test_headers(self) -> None:
        nid = await self.enqueue()
        response, _ = await self.get(f"/acme/notifications/id/{nid}")
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, "Cache-Control"), "no-store")
        self.assertEqual(header(response, "X-Content-Type-Options"), "nosniff")
        self.assertEqual(header(response, "Content-Type"), "application/json")
        self.assertEqual(header(response, "Server"), "mailrelay")

    async def test_head(self) -> None:
        nid = await self.enqueue()
        response, body = await self.get(f"/acme/notifications/id/{nid}", method="HEAD")
        self.assertEqual((response.code, body), (200, b""))
        self.assertEqual(header(response, "Cache-Control"), "no-store")


class AuthenticationTests(WebSiteTestsBase):
    """Basic auth: the portal decides, the throttle counts, the path must be the caller's."""

    async def assertUnauthorized(self, **kwargs: Any) -> None:
        response, body = await self.get("/acme/notifications/id/1", **kwargs)
        self.assertEqual(response.code, 401, body)
        self.assertEqual(header(response, "WWW-Authenticate"), 'Basic realm="mailrelay"')
        self.assertEqual(header(response, "Cache-Control"), "no-store")
        self.assertError(json.loads(body), 401)

    async def test_noCredentials(self) -> None:
        await self.assertUnauthorized(auth=None)

    async def test_wrongPassword(self) -> None:
        await self.assertUnauthorized(auth=("acme", "wrong"))

    async def test_unknownUser(self) -> None:
        await self.assertUnauthorized(auth=("nobody", PASSWORD))

    async def test_disabledAccount(self) -> None:
        response, _ = await self.get("/initech/notifications/id/1", auth=("initech", PASSWORD))
        self.assertEqual(response.code, 401)

    async def test_clientOutsideAccountNetworks(self) -> None:
        """netco may log in from 10.0.0.0/8 only; the test client is 127.0.0.1."""
        response, _ = await self.get("/netco/notifications/id/1", auth=("netco", PASSWORD))
        self.assertEqual(response.code, 401)

    async def test_malformedAuthorization(self) -> None:
        for value in (b"Basic !!!", b"Bearer abc", b"Basic " + base64.b64encode(b"no-colon")):
            await self.assertUnauthorized(authorization=value)

    async def test_apiKey(self) -> None:
        nid = await self.enqueue()
        document = await self.getJSON(f"/acme/notifications/id/{nid}", auth=("App", self.apiKey))
        self.assertEqual(len(document["SAPnotification"]["status"]), 2)

    async def test_wrongApiKey(self) -> None:
        await self.assertUnauthorized(auth=("App", self.apiKey + "x"))

    async def test_otherAccountsPath(self) -> None:
        nid = await self.enqueue(account="globex")
        for auth in (("acme", PASSWORD), ("App", self.apiKey)):
            response, body = await self.get(f"/globex/notifications/id/{nid}", auth=auth)
            self.assertEqual(response.code, 403, auth)
            self.assertEqual(header(response, "Cache-Control"), "no-store")
            self.assertError(json.loads(body), 403)
            self.assertNotIn(nid.encode(), body)

    async def test_disabledAfterLoginTakesEffectAtOnce(self) -> None:
        """A remembered login is still checked by the realm on every request."""
        nid = await self.enqueue()
        await self.getJSON(f"/acme/notifications/id/{nid}")
        await self.changeAccount("acme", enabled=False)
        await self.assertUnauthorized()

    async def test_passwordChangeTakesEffectAtOnce(self) -> None:
        nid = await self.enqueue()
        await self.getJSON(f"/acme/notifications/id/{nid}")
        await self.changeAccount("acme", password_hash=OTHER_HASH)
        await self.assertUnauthorized()
        await self.getJSON(f"/acme/notifications/id/{nid}", auth=("acme", OTHER_PASSWORD))

    async def test_rememberedLoginExpires(self) -> None:
        """A verified password is remembered for a minute of the site's clock (no Argon2
        verification for a poll), then verified again."""
        nid = await self.enqueue()
        await self.getJSON(f"/acme/notifications/id/{nid}")
        self.assertEqual(self.passwords.verifications, 1)
        self.clock.advance(59)
        await self.getJSON(f"/acme/notifications/id/{nid}")
        self.assertEqual(self.passwords.verifications, 1)
        self.clock.advance(3600)
        await self.getJSON(f"/acme/notifications/id/{nid}")
        self.assertEqual(self.passwords.verifications, 2)

    async def test_throttled(self) -> None:
        for _ in range(MAX_FAILURES):
            await self.assertUnauthorized(auth=("acme", "wrong"))
        # Now even the right password is not checked.
        response, body = await self.get("/acme/notifications/id/1")
        self.assertEqual((response.code, response.phrase), (429, b"Too Many Requests"), body)
        self.assertEqual(header(response, "Retry-After"), "300")
        self.assertError(json.loads(body), 429)
        # The failure window passes: logins are checked again.
        self.clock.advance(301)
        await self.getJSON("/acme/notifications/id/1")

    async def test_throttleSharedWithSMTP(self) -> None:
        """Failures SMTP AUTH recorded for this address count on the web too."""
        for _ in range(MAX_FAILURES):
            self.throttle.failed("127.0.0.1")
        response, _ = await self.get("/acme/notifications/id/1")
        self.assertEqual(response.code, 429)

    async def test_secretsNeverLogged(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        nid = await self.enqueue()
        await self.get(f"/acme/notifications/id/{nid}")
        await self.get(f"/acme/notifications/id/{nid}", auth=("acme", "wrong-" + PASSWORD))
        await self.get(f"/acme/notifications/id/{nid}", auth=("App", self.apiKey))
        self.assertTrue(events)
        logged = "\n".join(f"{formatEvent(e)} {e!r}" for e in events)
        for secret in (PASSWORD, self.apiKey, basic("acme", PASSWORD).decode()[6:]):
            self.assertNotIn(secret, logged)
        self.assertNotIn("authorization", logged.lower())

    async def test_successDoesNotClearFailures(self) -> None:
        """Logging in as oneself between guesses does not keep the count down."""
        for _ in range(MAX_FAILURES - 1):
            await self.assertUnauthorized(auth=("acme", "wrong"))
            await self.getJSON("/acme/notifications/id/1")
        await self.assertUnauthorized(auth=("acme", "wrong"))
        await self.getJSON("/acme/notifications/id/1", expectedCode=429)


class BulkTests(WebSiteTestsBase):
    """``GET /{accountId}/notifications/bulk/{bulkId}``."""

    async def test_listing(self) -> None:
        first = await self.enqueue(bulkId="spring", recipients=(ALICE,))
        await self.enqueue(bulkId="autumn")
        await self.enqueue(account="globex", bulkId="spring")
        second = await self.enqueue(bulkId="spring", recipients=(PHONE,))
        document = await self.getJSON("/acme/notifications/bulk/spring")
        self.assertEqual(set(document), {"bulkId", "notifications", "next"})
        self.assertEqual(document["bulkId"], "spring")
        self.assertIsNone(document["next"])
        notifications = document["notifications"]
        self.assertEqual(
            [n["SAPnotification"]["notificationId"] for n in notifications], [first, second]
        )
        self.assertEqual(
            notifications[1],
            await self.getJSON(f"/acme/notifications/id/{second}"),
        )

    async def test_expiredLeftOut(self) -> None:
        await self.enqueue(bulkId="spring", receivedAt=NOW - timedelta(days=30))
        kept = await self.enqueue(bulkId="spring")
        document = await self.getJSON("/acme/notifications/bulk/spring")
        ids = [n["SAPnotification"]["notificationId"] for n in document["notifications"]]
        self.assertEqual(ids, [kept])

    async def test_recipientFilter(self) -> None:
        await self.enqueue(bulkId="spring", recipients=(ALICE,))
        await self.enqueue(bulkId="spring", recipients=(ALICE, PHONE))
        document = await self.getJSON(
            "/acme/notifications/bulk/spring?recipient=sms:+4477331234567"
        )
        counts = [len(n["SAPnotification"]["status"]) for n in document["notifications"]]
        self.assertEqual(counts, [0, 1])

    async def test_pages(self) -> None:
        ids = [await self.enqueue(bulkId="spring") for _ in range(5)]
        seen: list[str] = []
        after = ""
        pages = 0
        while True:
            document = await self.getJSON(f"/acme/notifications/bulk/spring?limit=2{after}")
            seen += [n["SAPnotification"]["notificationId"] for n in document["notifications"]]
            pages += 1
            if document["next"] is None:
                break
            after = f"&after={document['next']}"
        self.assertEqual((seen, pages), (ids, 3))

    async def test_badPageParameters(self) -> None:
        for query in ("limit=0", "limit=1001", "limit=x", "after=abc", "limit=" + "9" * 5000):
            document = await self.getJSON(
                f"/acme/notifications/bulk/spring?{query}", expectedCode=400
            )
            self.assertError(document, 400)

    async def test_unknownBulk(self) -> None:
        document = await self.getJSON("/acme/notifications/bulk/nothing")
        self.assertEqual(document, {"bulkId": "nothing", "notifications": [], "next": None})

    async def test_otherAccountsBulk(self) -> None:
        await self.enqueue(account="globex", bulkId="spring")
        document = await self.getJSON("/globex/notifications/bulk/spring", expectedCode=403)
        self.assertError(document, 403)
        document = await self.getJSON("/acme/notifications/bulk/spring")
        self.assertEqual(document["notifications"], [])

    async def test_unauthenticated(self) -> None:
        response, _ = await self.get("/acme/notifications/bulk/spring", auth=None)
        self.assertEqual(response.code, 401)
        self.assertEqual(header(response, "WWW-Authenticate"), 'Basic realm="mailrelay"')


class OperationsTests(WebSiteTestsBase):
    """``/healthz``, ``/metrics``, ``/openapi.json``, and answers to what is not there."""

    def exchange(self, request: bytes) -> Any:
        """Send raw bytes on a new connection (in a thread); all it gets back until the server
        closes the connection (or 10 s pass)."""
        port = int(self.base.rsplit(":", 1)[1])

        def talk() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                try:
                    client.sendall(request)
                except OSError:
                    pass  # the server may close before all of a large body is sent
                received = b""
                while chunk := client.recv(65536):
                    received += chunk
                return received

        return deferToThread(talk)

    async def test_largeBodyRefused(self) -> None:
        """The API reads no body, and does not keep one: a declared or chunked body over the
        limit gets a JSON 413 and the connection closed, before more of it is read."""
        head = b"POST /healthz HTTP/1.1\r\nHost: x\r\n"
        declared = await self.exchange(head + b"Content-Length: 10000000000\r\n\r\n")
        chunk = b"%x\r\n" % 4096 + b"a" * 4096 + b"\r\n"
        count = MAX_REQUEST_BODY // 4096 + 2
        chunked = await self.exchange(head + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * count)
        for answer in (declared, chunked):
            status, _, rest = answer.partition(b"\r\n")
            self.assertEqual(status, b"HTTP/1.1 413 Content Too Large")
            headers, _, body = rest.partition(b"\r\n\r\n")
            self.assertIn(b"Connection: close", headers)
            self.assertEqual(json.loads(body)["error"]["code"], 413)

    async def test_smallBodyIgnored(self) -> None:
        answer = await self.exchange(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Length: 5\r\n\r\nhello"
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:100])

    async def test_healthy(self) -> None:
        document = await self.getJSON("/healthz", auth=None)
        self.assertEqual(document["status"], "ok")
        self.assertEqual(document["listeners"], [{"endpoint": "tcp:587", "up": True}])
        self.assertEqual(set(document["store"]), {"backend", "ok", "latency_ms"})
        self.assertEqual(document["store"]["backend"], "sqlite")
        self.assertIs(document["store"]["ok"], True)
        self.assertGreaterEqual(document["store"]["latency_ms"], 0)
        self.assertEqual(document["workers"], {"configured": 1, "serving": 1})
        self.assertNotIn("web_process", document)  # the endpoint has no process of its own

    async def test_storeDown(self) -> None:
        await self.store.close()
        document = await self.getJSON("/healthz", auth=None, expectedCode=503)
        self.assertEqual(document["status"], "unavailable")
        self.assertEqual(document["store"], {"backend": "sqlite", "ok": False, "latency_ms": None})

    async def test_listenerDown(self) -> None:
        self.listeners = [ListenerState("tcp:587", True), ListenerState("tcp:465", False)]
        document = await self.getJSON("/healthz", auth=None, expectedCode=503)
        self.assertEqual(document["status"], "unavailable")
        self.assertIs(document["store"]["ok"], True)

    async def test_storeDownIsNot500(self) -> None:
        """A status lookup while the store is closed: 503 with the generic body."""
        await self.getJSON("/acme/notifications/id/1")  # log in while the store is up
        await self.store.close()
        document = await self.getJSON("/acme/notifications/id/1", expectedCode=503)
        self.assertError(document, 503)

    async def test_metrics(self) -> None:
        await self.enqueue()
        await self.enqueue()
        await self.get("/acme/notifications/id/1", auth=("acme", "wrong"))
        response, body = await self.get("/metrics", auth=None)
        self.assertEqual(response.code, 200)
        self.assertTrue(str(header(response, "Content-Type")).startswith("text/plain"))
        self.assertEqual(header(response, "X-Content-Type-Options"), "nosniff")
        text = body.decode("utf-8")
        for name in (
            "mailrelay_connections_total",
            "mailrelay_sessions_active",
            "mailrelay_auth_total",
            "mailrelay_messages_total",
            "mailrelay_store_ping_seconds_count",
        ):
            self.assertIn(f"# TYPE {name.removesuffix('_count').removesuffix('_total')}", text)
        self.assertIn('mailrelay_queue_depth{state="queued"} 2.0', text)
        self.assertIn('mailrelay_queue_depth{state="in_flight"} 0.0', text)
        self.assertIn('mailrelay_auth_total{result="failure"}', text)
        self.assertRegex(text, r"mailrelay_store_ping_seconds_count [1-9]")

    async def test_metricsWithStoreDown(self) -> None:
        await self.store.close()
        response, body = await self.get("/metrics", auth=None)
        self.assertEqual(response.code, 200)
        self.assertIn(b"mailrelay_queue_depth", body)

    async def test_openapi(self) -> None:
        document = await self.getJSON("/openapi.json", auth=None)
        self.assertTrue(document["openapi"].startswith("3."))
        self.assertEqual(
            set(document["paths"]),
            {
                "/{accountId}/notifications/id/{notificationId}",
                "/{accountId}/notifications/bulk/{bulkId}",
                "/healthz",
                "/metrics",
                "/openapi.json",
            },
        )
        try:
            from openapi_spec_validator import validate
        except ImportError:  # pragma: no cover
            return
        validate(document)

    async def test_notFound(self) -> None:
        for path in (
            "/",
            "/nothing",
            "/healthz/",
            "/acme/notifications",
            "/acme/notifications/id/",
            "/acme/notifications/other/1",
            "/acme/notifications/id/1/more",
            "//notifications/id/1",
            "/%ff/notifications/id/1",
        ):
            document = await self.getJSON(path, auth=None, expectedCode=404)
            self.assertError(document, 404)

    async def test_methodNotAllowed(self) -> None:
        for method, path in (
            ("POST", "/acme/notifications/id/1"),
            ("DELETE", "/acme/notifications/bulk/b"),
            ("PUT", "/healthz"),
            ("POST", "/metrics"),
            ("OPTIONS", "/openapi.json"),
        ):
            response, body = await self.get(path, method=method)
            self.assertEqual(response.code, 405, (method, path))
            self.assertEqual(header(response, "Allow"), "GET, HEAD")
            self.assertError(json.loads(body), 405)
