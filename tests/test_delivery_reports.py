"""
Delivery reports and open/click tracking (SPEC §8.4, §8.5) with real sockets: the whole relay
delivering to a scripted sink and POSTing reports to a real twisted.web server on loopback,
signatures checked with the ``standardwebhooks`` package; the SSRF-safe agent refusing loopback,
decimal, IPv4-mapped and DNS-named private addresses without a connection.
"""

from __future__ import annotations

import email
import email.policy
import json
import quopri
import re
from collections.abc import Sequence
from email.message import EmailMessage
from typing import Any
from xml.etree import ElementTree

import treq
from standardwebhooks.webhooks import Webhook
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from mailrelay.delivery.reports import (
    JSON,
    RETRY_DELAYS,
    XML,
    batches,
    renderDocument,
    reportsFor,
    retryAt,
)
from mailrelay.delivery.smtp.mx import makeResolver
from mailrelay.delivery.smtp.safeagent import safeAgent
from mailrelay.interfaces import AlreadyExists
from mailrelay.message.tracking import Tracker
from mailrelay.model import HeaderOptions, Notification, Recipient, StatusEvent, fromTimestamp
from mailrelay.netaddress import AddressPolicy
from tests.dns_server import startDNSServer
from tests.relay_fixture import (
    ACCOUNT,
    CLIENT_TIMEOUT,
    PASSWORD,
    SENDER,
    RelayFiles,
    RunningRelay,
    freePort,
    startRelay,
)
from tests.smtp_sinks import startScriptedSink
from tests.test_integration import RecordingSMTP, acceptedId

ALICE = "alice@customer.example"


class Receiver(Resource):
    """A customer's callback endpoint: answers each POST with the next of ``codes`` (the
    last one for ever after) and keeps what it got."""

    isLeaf = True

    def __init__(self, codes: Sequence[int] = (200,)) -> None:
        super().__init__()
        self.codes = list(codes)
        self.requests: list[tuple[dict[str, str], bytes]] = []

    def render_POST(self, request: Any) -> bytes:
        headers = {
            k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()
        }
        self.requests.append((headers, request.content.read()))
        code = self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]
        request.setResponseCode(code)
        return b"ok" * 50_000  # more than the relay reads


async def startReceiver(test: TestCase, codes: Sequence[int] = (200,)) -> tuple[Receiver, int]:
    receiver = Receiver(codes)
    port = reactor.listenTCP(0, Site(receiver), interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    return receiver, port.getHost().port


def submit(relay: RunningRelay, headers: dict[str, str], html: str | None = None) -> str:
    """Blocking: one message to ALICE with these X-IB-* headers; the notification id."""
    letter = EmailMessage()
    letter["From"] = SENDER
    letter["To"] = ALICE
    letter["Subject"] = "reports"
    for name, value in headers.items():
        letter[name] = value
    letter.set_content("Hello.\n")
    if html is not None:
        letter.add_alternative(html, subtype="html")
    with RecordingSMTP(
        "127.0.0.1", relay.ports["starttls"], local_hostname="app.test", timeout=CLIENT_TIMEOUT
    ) as smtp:
        smtp.starttls(context=relay.files.clientContext())
        smtp.login(ACCOUNT, PASSWORD)
        smtp.send_message(letter, to_addrs=[ALICE])
        assert smtp.dataReply is not None
        return acceptedId(smtp.dataReply[1].decode())


async def waitFor(condition: Any, timeout: float = 20.0) -> None:
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError("timed out waiting")
        await deferLater(reactor, 0.05, lambda: None)


def relayConfig(sinkPort: int, extra: str = "") -> str:
    return (
        "[delivery]\n"
        'mode = "smarthost"\n'
        f'smarthost = "tcp:host=127.0.0.1:port={sinkPort}"\n'
        'smarthost_tls = "none"\n'
        "[delivery_reports]\n"
        'allow_networks = ["127.0.0.0/8"]\n' + extra
    )


async def verified(relay: RunningRelay, headers: dict[str, str], body: bytes) -> None:
    """Check the signature as a customer would, with the standardwebhooks package."""
    (secret,) = await relay.store.webhookSecrets(ACCOUNT)
    Webhook(secret).verify(body, headers, json_parse=False)


class ReportTests(TestCase):
    timeout = 60

    async def relay(self, extra: str = "") -> RunningRelay:
        sink = await startScriptedSink(self)
        self.sink = sink
        return await startRelay(self, extra=relayConfig(sink.port, extra))

    async def test_jsonReportSignedWithCallbackData(self) -> None:
        receiver, port = await startReceiver(self)
        relay = await self.relay()
        nid = await deferToThread(
            submit,
            relay,
            {
                "X-IB-notify-url": f"http://127.0.0.1:{port}/dlr",
                "X-IB-callback-data": "order 42",
                "X-IB-bulk-id": "bulk-7",
            },
        )
        await waitFor(lambda: receiver.requests)
        headers, body = receiver.requests[0]
        await verified(relay, headers, body)
        self.assertEqual(headers["content-type"], JSON)
        (result,) = json.loads(body)["results"]
        self.assertEqual(
            (result["messageId"], result["bulkId"], result["callbackData"], result["to"]),
            (nid, "bulk-7", "order 42", ALICE),
        )
        self.assertEqual(result["status"]["groupName"], "DELIVERED")
        self.assertEqual(result["channel"], "EMAIL")
        self.assertRegex(result["doneAt"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0000$")
        # The relay records the attempt once the receiver's answer reaches it.
        deadline = reactor.seconds() + 5
        while not (attempts := await relay.store.reportAttempts(nid)):
            self.assertLess(reactor.seconds(), deadline, "the attempt was not recorded")
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(
            [(a.host, a.code, a.outcome) for a in attempts], [("127.0.0.1", 200, "sent")]
        )

    async def test_xmlReportAndRotation(self) -> None:
        receiver, port = await startReceiver(self)
        relay = await self.relay()
        await relay.store.setWebhookSecrets(ACCOUNT, ["whsec_" + "b" * 40, "whsec_" + "a" * 40])
        nid = await deferToThread(
            submit,
            relay,
            {
                "X-IB-notify-url": f"http://127.0.0.1:{port}/dlr",
                "X-IB-notify-content-type": "application/xml",
                "X-IB-callback-data": "xml data",
                "X-IB-bulk-id": "bulk-x",
                "X-IB-intermediate-report": "true",
            },
        )
        await waitFor(lambda: any(b"DELIVERED" in body for _, body in receiver.requests))
        documents = [ElementTree.fromstring(body) for _, body in receiver.requests]
        results = [r for d in documents for r in d.findall("./results/result")]
        groups = [r.findtext("status/groupName") for r in results]
        self.assertEqual(groups, ["PENDING", "DELIVERED"])  # CAAS_SENT with intermediate ones
        last = results[-1]
        self.assertEqual(
            (last.findtext("messageId"), last.findtext("bulkId"), last.findtext("callbackData")),
            (nid, "bulk-x", "xml data"),
        )
        for headers, body in receiver.requests:
            self.assertEqual(headers["content-type"], XML)
            self.assertEqual(len(headers["webhook-signature"].split()), 2)
            for secret in ("whsec_" + "b" * 40, "whsec_" + "a" * 40):
                Webhook(secret).verify(body, headers, json_parse=False)

    async def test_retriedAfterServerError(self) -> None:
        """500, then 200 five seconds later: two POSTs of the same report (same webhook-id),
        and the second counts."""
        receiver, port = await startReceiver(self, [500, 200])
        relay = await self.relay()
        nid = await deferToThread(
            submit, relay, {"X-IB-notify-url": f"http://127.0.0.1:{port}/dlr"}
        )
        await waitFor(lambda: len(receiver.requests) >= 2, timeout=30)
        (h1, b1), (h2, b2) = receiver.requests
        self.assertEqual((h1["webhook-id"], b1), (h2["webhook-id"], b2))
        await verified(relay, h2, b2)

        async def attempts() -> list[tuple[int, str]]:
            return [(a.code, a.outcome) for a in await relay.store.reportAttempts(nid)]

        deadline = reactor.seconds() + 5
        while await attempts() != [(500, "retry"), (200, "sent")]:
            self.assertLess(reactor.seconds(), deadline, await attempts())
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(await relay.store.pendingReports(), 0)

    async def test_pendingReportsSentAfterRestart(self) -> None:
        receiver, port = await startReceiver(self, [503, 200])
        sink = await startScriptedSink(self)
        files = RelayFiles(__import__("pathlib").Path(self.mktemp()), extra=relayConfig(sink.port))
        first = RunningRelay(files)
        self.addCleanup(first.stop)
        await first.start()
        nid = await deferToThread(submit, first, {"X-IB-notify-url": f"http://127.0.0.1:{port}/d"})
        await waitFor(lambda: len(receiver.requests) == 1)
        await deferLater(reactor, 0.5, lambda: None)
        await first.stop()
        self.assertEqual(len(receiver.requests), 1)

        second = RunningRelay(files)
        self.addCleanup(second.stop)
        try:
            await second.start()
        except AlreadyExists:  # the account is there from the first start
            pass
        await waitFor(lambda: len(receiver.requests) == 2, timeout=30)
        self.assertEqual(receiver.requests[0][1], receiver.requests[1][1])
        self.assertIn(nid.encode(), receiver.requests[1][1])


class _Counting(Protocol):
    def connectionMade(self) -> None:
        self.factory.connections += 1  # type: ignore[attr-defined]


class SSRFTests(TestCase):
    timeout = 30

    async def test_privateTargetsRefusedWithoutConnection(self) -> None:
        factory = Factory.forProtocol(_Counting)
        factory.connections = 0  # type: ignore[attr-defined]
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        dns = await startDNSServer(self, {"internal.test": {"A": ["10.0.0.1"]}})
        agent = safeAgent(reactor, makeResolver([dns.nameserver], reactor), AddressPolicy(()))
        for url in (
            f"http://127.0.0.1:{port}/",
            f"http://2130706433:{port}/",
            f"http://[::ffff:127.0.0.1]:{port}/",
            f"http://internal.test:{port}/",
        ):
            with self.assertRaises(Exception, msg=url) as caught:
                await treq.post(url, data=b"{}", agent=agent, allow_redirects=False)
            self.assertIsNotNone(caught.exception, url)
        self.assertEqual(factory.connections, 0)  # type: ignore[attr-defined]


class ReportLogicTests(TestCase):
    def notification(self, **options: Any) -> Notification:
        return Notification(
            "100",
            "acme",
            SENDER,
            (Recipient(ALICE, "email"),),
            10,
            fromTimestamp(1_700_000_000),
            HeaderOptions(notify_url="https://x.example/dlr", **options),
        )

    def event(self, code: str, text: str = "ok") -> StatusEvent:
        return StatusEvent(
            "100", Recipient(ALICE, "email"), code, text, fromTimestamp(1_700_000_001)
        )

    def test_finalOnlyWithoutIntermediate(self) -> None:
        n = self.notification()
        codes = ["CAAS_SENT", "CH_DEFERRED", "CH_RECEIVED", "CH_FAILED", "CAAS_FAILED"]
        reports = reportsFor(n, [self.event(c) for c in codes])
        groups = [json.loads(r.result)["status"]["groupName"] for r in reports]
        self.assertEqual(groups, ["DELIVERED", "UNDELIVERABLE", "REJECTED"])
        expired = reportsFor(n, [self.event("CAAS_FAILED", "expired: timeout")])
        self.assertEqual(json.loads(expired[0].result)["status"]["groupName"], "EXPIRED")

    def test_receivedThenSentIsOneReport(self) -> None:
        n = self.notification(intermediate_report=True)
        reports = reportsFor(n, [self.event("CH_RECEIVED"), self.event("CH_SENT")])
        self.assertEqual(len(reports), 1)
        pending = reportsFor(n, [self.event("CH_RECEIVED")], receiptsFollow=frozenset({"email"}))
        self.assertEqual(json.loads(pending[0].result)["status"]["groupName"], "PENDING")

    def test_noUrlNoReport(self) -> None:
        n = Notification("1", "a", SENDER, (), 1, fromTimestamp(0))
        self.assertEqual(reportsFor(n, [self.event("CH_SENT")]), [])

    def test_schedule(self) -> None:
        self.assertEqual(retryAt(0, 0), fromTimestamp(5))
        self.assertEqual(retryAt(8, 0), fromTimestamp(86400))
        self.assertIsNone(retryAt(len(RETRY_DELAYS), 0))

    def test_batchesOfAHundred(self) -> None:
        from mailrelay.model import ClaimedReport

        n = self.notification()
        reports = reportsFor(n, [self.event("CH_SENT")] * 250)
        claims = [ClaimedReport(r, 0, "l") for r in reports]
        self.assertEqual([len(b) for b in batches(claims)], [100, 100, 50])
        document = ElementTree.fromstring(renderDocument([{"a": {"b": True}}], XML))
        self.assertEqual(document.findtext("results/result/a/b"), "true")


class TrackingTests(TestCase):
    timeout = 60

    def test_tamperedTokenRefused(self) -> None:
        tracker = Tracker("https://t.example", b"k" * 32)
        token = tracker.token("c", "1", Recipient(ALICE, "email"), "https://shop.example/")
        self.assertEqual(tracker.read("c", token).link, "https://shop.example/")  # type: ignore[union-attr]
        payload, _, mac = token.partition(".")
        self.assertIsNone(tracker.read("o", token))
        self.assertIsNone(tracker.read("c", payload[:-2] + "AA." + mac))
        self.assertIsNone(
            tracker.read(
                "c",
                Tracker("x", b"j" * 32).token(
                    "c", "1", Recipient(ALICE, "email"), "https://evil.example/"
                ),
            )
        )

    async def test_clickRedirectsAndIsReported(self) -> None:
        receiver, port = await startReceiver(self)
        sink = await startScriptedSink(self)
        trackingPort = freePort()
        relay = await startRelay(
            self,
            extra=relayConfig(
                sink.port,
                "[tracking]\n"
                f'base_url = "http://127.0.0.1:{trackingPort}"\n'
                f'endpoint = "tcp:{trackingPort}:interface=127.0.0.1"\n',
            ),
        )
        original = "https://shop.example/item?id=7&ref=mail"
        nid = await deferToThread(
            submit,
            relay,
            {
                "X-IB-tracking-url": f"http://127.0.0.1:{port}/track",
                "X-IB-callback-data": "campaign 9",
            },
            f'<html><body><p><a href="{original.replace("&", "&amp;")}">Buy</a></p></body></html>',
        )
        await waitFor(lambda: sink.messages)
        delivered = email.message_from_bytes(sink.messages[0].message, policy=email.policy.default)
        html = delivered.get_body(("html",)).get_content()  # type: ignore[union-attr]
        (link,) = re.findall(r'href="([^"]+)"', html)
        self.assertTrue(link.startswith(f"http://127.0.0.1:{trackingPort}/t/c/"), link)
        self.assertNotIn("shop.example", link)
        self.assertIn(f"http://127.0.0.1:{trackingPort}/t/o/", html)

        response = await treq.get(link, allow_redirects=False, persistent=False)
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders("location"), [original])
        await response.content()
        await waitFor(lambda: receiver.requests)
        headers, body = receiver.requests[0]
        await verified(relay, headers, body)
        (result,) = json.loads(body)["results"]
        self.assertEqual(
            (
                result["notificationType"],
                result["url"],
                result["messageId"],
                result["callbackData"],
            ),
            ("CLICKED", original, nid, "campaign 9"),
        )
        trail = [(e.status_code, e.status_text) for e in await relay.store.statusTrail(nid)]
        self.assertIn(("CLICKED", original), trail)

        tampered = link[:-3] + ("AAA" if not link.endswith("AAA") else "BBB")
        refused = await treq.get(tampered, allow_redirects=False, persistent=False)
        self.assertEqual(refused.code, 404)
        await refused.content()
        pixel = re.search(r'src="([^"]+/t/o/[^"]+)"', html)
        assert pixel is not None
        opened = await treq.get(pixel.group(1), persistent=False)
        self.assertEqual((opened.code, await opened.content())[0], 200)
        trail = [e.status_code for e in await relay.store.statusTrail(nid)]
        self.assertIn("OPENED", trail)


_ = quopri  # the delivered HTML is read through the email package, which decodes it
