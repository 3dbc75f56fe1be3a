"""
The HTTP gateway: a local twisted.web gateway on loopback takes the JSON POST, and signed
receipts at ``POST /dlr/sms`` end the trail; unsigned or malformed ones get 4xx and change
nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from mailrelay.model import Sender
from tests.relay_fixture import ACCOUNT, RunningRelay, startRelay
from tests.test_delivery_e2e import smarthostConfig, trailOf
from tests.test_integration import acceptedId
from tests.test_sms_e2e import SENDER_NUMBER, session, waitForCode

KEY = b"0123456789abcdef0123456789abcdef"


class Gateway(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[dict[str, Any]] = []
        self.answer = 200
        self.headers: list[Any] = []

    def render_POST(self, request: Any) -> bytes:
        self.posts.append(json.loads(request.content.read()))
        self.headers.append(request.getHeader(b"authorization"))
        request.setResponseCode(self.answer)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(
            {"messages": [{"status": {"groupId": 1, "groupName": "PENDING"}}]}
        ).encode()


class HttpGatewayTests(TestCase):
    timeout = 60

    async def relay(self) -> tuple[RunningRelay, Gateway]:
        gateway = Gateway()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(gateway))
        self.addCleanup(port.stopListening)
        keyFile = self.mktemp()
        with open(keyFile, "wb") as f:
            f.write(KEY + b"\n")
        url = f"http://user:pw@127.0.0.1:{port.getHost().port}/sms/2/text/advanced"
        extra = smarthostConfig(1) + (
            f'\n[sms]\ngateway = "{url}"\nreceipt_secret_file = {json.dumps(keyFile)}\n'
        )
        relay = await startRelay(self, extra=extra)
        await relay.updateAccount(sms_enabled=True, networks=("127.0.0.0/8",))
        await relay.store.addSender(Sender(ACCOUNT, SENDER_NUMBER, "sms"))
        return relay, gateway

    async def post(self, relay: RunningRelay, body: bytes, signature: str | None) -> int:
        headers = {"Content-Type": ["application/json"]}
        if signature is not None:
            headers["X-Mailrelay-Signature"] = [signature]
        response = await treq.post(
            f"http://127.0.0.1:{relay.ports['web']}/dlr/sms",
            data=body,
            headers=headers,
            persistent=False,
        )
        await treq.content(response)
        return int(response.code)

    async def test_sentThenReceipted(self) -> None:
        relay, gateway = await self.relay()
        answers = await deferToThread(
            session, relay.ports["network"], b"Hello over HTTP\r\n", None, False
        )
        nid = acceptedId(answers[-1].split(" ", 2)[2])
        await waitForCode(relay, nid, "CH_RECEIVED")
        (post,) = gateway.posts
        (message,) = post["messages"]
        self.assertEqual(message["text"], "Hello over HTTP")
        self.assertEqual(message["from"], "393331234567")
        destination = message["destinations"][0]
        self.assertEqual(destination["to"], "4477331234567")
        self.assertTrue(gateway.headers[0].startswith(b"Basic "))

        receipt = json.dumps(
            {
                "results": [
                    {
                        "messageId": destination["messageId"],
                        "to": "4477331234567",
                        "status": {"groupId": 3, "groupName": "DELIVERED"},
                    }
                ]
            }
        ).encode()
        # Unsigned, wrongly signed, malformed: 4xx, nothing written.
        self.assertEqual(await self.post(relay, receipt, None), 401)
        self.assertEqual(await self.post(relay, receipt, "sha256=" + "0" * 64), 401)
        junk = b'{"results": [{"messageId": 1}]}'
        self.assertEqual(await self.post(relay, junk, sign(junk)), 400)
        self.assertNotIn("CH_SENT", [code for _, code in await trailOf(relay, nid)])
        self.assertEqual(await self.post(relay, receipt, sign(receipt)), 204)
        await waitForCode(relay, nid, "CH_SENT")

    async def test_serverErrorDefers(self) -> None:
        relay, gateway = await self.relay()
        gateway.answer = 503
        answers = await deferToThread(session, relay.ports["network"], b"Later\r\n", None, False)
        nid = acceptedId(answers[-1].split(" ", 2)[2])
        await waitForCode(relay, nid, "CH_DEFERRED")

    async def test_refusedFails(self) -> None:
        relay, gateway = await self.relay()
        gateway.answer = 400
        answers = await deferToThread(session, relay.ports["network"], b"No\r\n", None, False)
        nid = acceptedId(answers[-1].split(" ", 2)[2])
        await waitForCode(relay, nid, "CH_FAILED")


def sign(body: bytes) -> str:
    return "sha256=" + hmac.new(KEY, body, hashlib.sha256).hexdigest()
