"""
The HTTP gateway: one JSON POST per text in the shape of Infobip's ``/sms/2/text/advanced``
(the gateway segments the text itself), and the receipts it posts back to ``POST /dlr/sms``.

Request: ``{"messages": [{"from": SENDER, "destinations": [{"to": DIGITS, "messageId":
"<notificationId>.<DIGITS>"}], "text": TEXT}]}``, with HTTP Basic auth when the gateway URL
carries ``USER:PASSWORD@``. A 2xx answer is accepted (``CH_RECEIVED``) unless the message's
status group is 5 (REJECTED); 408, 429 and 5xx, a timeout or no connection are temporary;
any other answer is final.

Receipts: ``{"results": [{"messageId": ..., "status": {"groupName": "DELIVERED", ...},
"error": {...}}]}`` signed with ``X-Mailrelay-Signature: sha256=<hex HMAC-SHA256 of the
body>`` under the key in ``[sms] receipt_secret_file``. A receipt that is unsigned, wrongly
signed or malformed is answered 4xx and changes nothing: every result is read before any is
applied.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool

from mailrelay.delivery.sms.gateway import SmsMessage, Submission
from mailrelay.delivery.sms.receipts import Receipt, ReceiptBook, httpMessageId

log = Logger()

SIGNATURE_HEADER = b"x-mailrelay-signature"
MAX_RECEIPT_BODY = 64 * 1024
RESPONSE_LIMIT = 64 * 1024
GROUP_STATES = {
    "DELIVERED": "DELIVRD",
    "UNDELIVERABLE": "UNDELIV",
    "REJECTED": "REJECTD",
    "EXPIRED": "EXPIRED",
    "PENDING": "ENROUTE",
}
"""Infobip status groups as SMPP receipt states (:data:`.receipts.RECEIPT_STATES`)."""


class HTTPGateway:
    """An HTTPS (or, for tests, HTTP) SMS gateway; see the module docstring."""

    def __init__(self, url: str, reactor: Any, timeout: float = 30.0, http: Any = None) -> None:
        parts = urlsplit(url)
        self.label = parts.hostname or "gateway"
        if parts.port:
            self.label += f":{parts.port}"
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        self._url = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        self._headers = {"Content-Type": ["application/json"], "Accept": ["application/json"]}
        if parts.username:
            token = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            basic = base64.b64encode(token.encode()).decode("ascii")
            self._headers["Authorization"] = [f"Basic {basic}"]
        self._timeout = timeout
        if http is None:
            # A connection per POST: nothing left open for the relay's stop to wait for.
            # (Persistent connections, closed at stop, are the next step for throughput.)
            pool = HTTPConnectionPool(reactor, persistent=False)
            http = HTTPClient(Agent(reactor, pool=pool))
        self._http = http
        self._reactor = reactor

    def submit(self, message: SmsMessage) -> Deferred[Submission]:
        return Deferred.fromCoroutine(self._submit(message))

    async def _submit(self, message: SmsMessage) -> Submission:
        messageId = httpMessageId(message.notificationId, message.recipient)
        document = {
            "messages": [
                {
                    "from": message.sender.lstrip("+"),
                    "destinations": [
                        {"to": message.recipient.address.lstrip("+"), "messageId": messageId}
                    ],
                    "text": message.text,
                }
            ]
        }
        try:
            response = await self._http.post(
                self._url,
                data=json.dumps(document).encode("utf-8"),
                headers=self._headers,
                timeout=self._timeout,
            )
            body = await treq.content(response)
        except Exception as e:
            return Submission("deferred", f"{self.label}: {type(e).__name__}")
        code = response.code
        if code in (408, 429) or code >= 500:
            return Submission("deferred", f"{self.label}: HTTP {code}")
        if not 200 <= code < 300:
            return Submission("failed", f"{self.label}: HTTP {code}")
        group = _statusGroup(body[:RESPONSE_LIMIT])
        if group == "REJECTED":
            return Submission("failed", f"{self.label}: HTTP {code}, message rejected")
        return Submission("delivered", f"{self.label}: HTTP {code}, accepted", (messageId,))


def _statusGroup(body: bytes) -> str:
    """The first message's status group name in the gateway's answer ('' if unreadable)."""
    try:
        document = json.loads(body)
        status = document["messages"][0]["status"]
        return str(status.get("groupName", "")).upper()
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return ""


class BadReceipt(ValueError):
    """A receipt post that is not one (4xx, nothing applied)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class HttpReceipts:
    """``POST /dlr/sms``: signed receipts into the :class:`~.receipts.ReceiptBook`."""

    book: ReceiptBook
    key: bytes

    def sign(self, body: bytes) -> str:
        """The signature header value a gateway sends with ``body``."""
        return "sha256=" + hmac.new(self.key, body, hashlib.sha256).hexdigest()

    def receive(self, body: bytes, signature: str | None) -> int:
        """Check and apply one post; how many receipts it carried. Raises BadReceipt."""
        if len(body) > MAX_RECEIPT_BODY:
            raise BadReceipt(413, "receipt post too large")
        if not signature or not hmac.compare_digest(signature.strip(), self.sign(body)):
            raise BadReceipt(401, "missing or wrong X-Mailrelay-Signature")
        receipts = parseReceipts(body)
        for receipt in receipts:
            self.book.receive(receipt)
        return len(receipts)


def parseReceipts(body: bytes) -> list[Receipt]:
    """Every receipt of a post; BadReceipt(400) if any is malformed."""
    try:
        results = json.loads(body)["results"]
        if not isinstance(results, list) or not results:
            raise TypeError("results must be a non-empty list")
        receipts = []
        for result in results:
            messageId = result["messageId"]
            group = str(result["status"]["groupName"]).upper()
            if not isinstance(messageId, str) or not messageId or group not in GROUP_STATES:
                raise ValueError(f"unknown status group {group!r} or message id")
            error = result.get("error") or {}
            receipts.append(Receipt(messageId, GROUP_STATES[group], str(error.get("id", ""))))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadReceipt(400, f"not a receipt document: {e}") from None
    return receipts
