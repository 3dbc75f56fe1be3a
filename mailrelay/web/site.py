"""
The web endpoint: one resource that routes every path, and :func:`makeWebSite` that builds it.

Routes (all ``GET``, and ``HEAD`` likewise):

- ``/{accountId}/notifications/id/{notificationId}[?recipient=...]`` -- SPEC §7, Basic auth
- ``/{accountId}/notifications/bulk/{bulkId}[?recipient=...&limit=N&after=ID]`` -- Basic auth
- ``/healthz``, ``/metrics``, ``/openapi.json`` -- no auth (the endpoint is loopback by default)
- ``POST /dlr/sms`` -- SMS delivery receipts of the HTTP gateway, authenticated by the HMAC of
  the body (:class:`~mailrelay.delivery.sms.http.HttpReceipts`); 404 when none is configured

In a web process of its own (:mod:`mailrelay.workers.web`), ``/healthz``, ``/metrics`` and
``/dlr/sms`` are the main process's to answer: they are forwarded to it.

Every answer, errors included, is built as a :class:`~mailrelay.web.responses.Response`, so the
headers (``nosniff``, ``Cache-Control``) and the JSON error bodies are the same everywhere.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import unquote

from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from mailrelay.auth.throttle import LoginThrottle
from mailrelay.config import Config
from mailrelay.delivery.service import DeliveryProbe
from mailrelay.delivery.sms.http import SIGNATURE_HEADER, BadReceipt, HttpReceipts
from mailrelay.interfaces import IStore, StoreError
from mailrelay.web.auth import BasicLogin, Throttled, Unauthenticated, clientAddress
from mailrelay.web.channel import HeadDeadlineChannel
from mailrelay.web.health import (
    Health,
    ListenerProbe,
    WebProcessProbe,
    WorkerProbe,
    noListeners,
    oneProcess,
)
from mailrelay.web.notifications import (
    BadQuery,
    NotificationStatus,
    pageCursor,
    pageLimit,
    recipientFilter,
)
from mailrelay.web.responses import (
    BoundedRequest,
    Response,
    errorResponse,
    jsonResponse,
    writeResponse,
)

ALLOWED_METHODS = (b"GET", b"HEAD")
AUTH_CHALLENGE = ("WWW-Authenticate", 'Basic realm="mailrelay"')
RETRY_AFTER = 300
"""Seconds a throttled client is told to wait: LoginThrottle's default failure window."""
REQUEST_TIMEOUT = 60
MAX_RECEIPT_POST = 64 * 1024
"""Seconds an idle HTTP connection stays open."""

log = Logger()

FORWARDED = (["healthz"], ["metrics"], ["dlr", "sms"])
"""The paths a web process of its own forwards to the main process."""

Handler = Callable[[server.Request], Awaitable[Response]]
"""Answers one request."""
AccountHandler = Callable[[server.Request, str], Awaitable[Response]]
"""Answers one request of an authenticated account (the second argument)."""


def openAPIDocument() -> bytes:
    """The OpenAPI 3 description of this API, as shipped in the package."""
    return resources.files("mailrelay.web").joinpath("openapi.json").read_bytes()


def queryParameters(request: server.Request) -> dict[str, list[str]]:
    """
    The query string's parameters. Unlike form decoding, ``+`` stays a plus: the values are
    addresses and E.164 numbers (``email:a+tag@example.com``, ``sms:+4477...``).
    """
    uri: bytes = request.uri
    _, _, query = uri.partition(b"?")
    parameters: dict[str, list[str]] = {}
    for pair in query.split(b"&"):
        if not pair:
            continue
        name, _, value = pair.partition(b"=")
        try:
            key = unquote(name.decode("ascii"), errors="strict")
            text = unquote(value.decode("ascii"), errors="strict")
        except UnicodeError:
            raise BadQuery("query string is not valid UTF-8 percent-encoding") from None
        parameters.setdefault(key, []).append(text)
    return parameters


def _segments(request: server.Request) -> list[str] | None:
    """The path's segments, percent-decoded, or None if they are not UTF-8."""
    try:
        return [segment.decode("utf-8") for segment in request.postpath or ()]
    except UnicodeDecodeError:
        return None


class WebRoot(Resource):
    """Routes every request of the web endpoint (see the module docstring)."""

    isLeaf = True

    def __init__(
        self,
        login: BasicLogin,
        notifications: NotificationStatus,
        health: Health,
        openapi: bytes,
        smsReceipts: HttpReceipts | None = None,
        forward: Callable[[server.Request], None] | None = None,
    ) -> None:
        super().__init__()
        self._forward = forward
        self._smsReceipts = smsReceipts
        self._login = login
        self._notifications = notifications
        self._health = health
        self._openapi = Response(200, openapi, cacheControl="public, max-age=3600")

    def render(self, request: server.Request) -> Any:
        segments = _segments(request)
        if self._forward is not None and segments in FORWARDED:
            self._forward(request)
            return server.NOT_DONE_YET
        if segments == ["dlr", "sms"] and self._smsReceipts is not None:
            if request.method != b"POST":
                writeResponse(request, errorResponse(405, headers=(("Allow", "POST"),)))
            else:
                writeResponse(request, self._smsReceipt(request, self._smsReceipts))
            return server.NOT_DONE_YET
        handler = self._route(segments)
        if handler is None:
            writeResponse(request, errorResponse(404))
        elif request.method not in ALLOWED_METHODS:
            writeResponse(request, errorResponse(405, headers=(("Allow", "GET, HEAD"),)))
        else:
            Deferred.fromCoroutine(self._answer(request, handler))
        return server.NOT_DONE_YET

    def _route(self, segments: list[str] | None) -> Handler | None:
        match segments:
            case ["healthz"]:
                return lambda request: self._health.healthz()
            case ["metrics"]:
                return lambda request: self._health.metrics()
            case ["openapi.json"]:
                return self._openAPI
            case [account, "notifications", "id", notificationId] if account and notificationId:
                return self._authenticated(account, self._byIdHandler(notificationId))
            case [account, "notifications", "bulk", bulkId] if account and bulkId:
                return self._authenticated(account, self._byBulkHandler(bulkId))
        return None

    def _smsReceipt(self, request: server.Request, receipts: HttpReceipts) -> Response:
        """One receipt post: 204 when applied; 4xx, nothing applied, otherwise."""
        assert request.content is not None
        body = request.content.read(MAX_RECEIPT_POST + 1)
        signature = request.getHeader(SIGNATURE_HEADER)
        try:
            receipts.receive(body, signature.decode("latin-1") if signature else None)
        except BadReceipt as e:
            log.info("sms receipt post refused: {reason}", reason=str(e))
            return errorResponse(e.code, str(e))
        return Response(204, b"")

    async def _openAPI(self, request: server.Request) -> Response:
        return self._openapi

    async def _answer(self, request: server.Request, handler: Handler) -> None:
        """Run ``handler`` and write what it answers; every failure becomes a JSON error."""
        finished = request.notifyFinish()
        lost: list[bool] = []
        finished.addErrback(lambda _: lost.append(True))
        try:
            response = await handler(request)
        except BadQuery as e:
            response = errorResponse(400, str(e))
        except StoreError as e:
            log.warn("web request: store unavailable: {error}", error=type(e).__name__)
            response = errorResponse(503)
        except Exception:
            log.failure("web request failed")
            response = errorResponse(500)
        if not lost:
            writeResponse(request, response)

    def _authenticated(self, account: str, handler: AccountHandler) -> Handler:
        """``handler`` for the path's ``account``, run only once the caller logged in as it."""

        async def checked(request: server.Request) -> Response:
            try:
                authenticated = await self._login.login(
                    request.getHeader(b"authorization"), clientAddress(request)
                )
            except Unauthenticated:
                return errorResponse(401, headers=(AUTH_CHALLENGE,))
            except Throttled:
                return errorResponse(429, headers=(("Retry-After", str(RETRY_AFTER)),))
            if authenticated != account:
                return errorResponse(403, "credentials of another account")
            return await handler(request, account)

        return checked

    def _byIdHandler(self, notificationId: str) -> AccountHandler:
        async def byId(request: server.Request, account: str) -> Response:
            query = queryParameters(request)
            document = await self._notifications.byId(
                account, notificationId, recipientFilter(query.get("recipient", []))
            )
            return jsonResponse(200, document)

        return byId

    def _byBulkHandler(self, bulkId: str) -> AccountHandler:
        async def byBulk(request: server.Request, account: str) -> Response:
            query = queryParameters(request)
            document = await self._notifications.byBulk(
                account,
                bulkId,
                recipient=recipientFilter(query.get("recipient", [])),
                after=pageCursor(query.get("after", [])),
                limit=pageLimit(query.get("limit", [])),
            )
            return jsonResponse(200, document)

        return byBulk


class QuietSite(server.Site):
    """A Site that writes no access line per request to the relay's log: customers poll the
    status API, and at a few hundred requests a second the lines would drown the mail log
    (and cost a fifth of the endpoint's CPU). Failures are still logged; request counts by
    outcome belong in a proxy in front, or in /metrics."""

    def log(self, request: Any) -> None:
        pass


def makeWebSite(
    store: IStore,
    portal: Portal,
    throttle: LoginThrottle,
    config: Config,
    clock: IReactorTime,
    listenersUp: ListenerProbe = noListeners,
    workers: WorkerProbe = oneProcess,
    delivery: DeliveryProbe | None = None,
    smsReceipts: HttpReceipts | None = None,
    forward: Callable[[server.Request], None] | None = None,
    webProcess: WebProcessProbe | None = None,
) -> server.Site:
    """
    The site of the web endpoint. ``portal`` and ``throttle`` are the SMTP listeners' own, so a
    client's failures count the same over both; ``clock`` tells the time for the retention
    period, the throttle and timeouts; ``listenersUp`` reports the SMTP listeners and
    ``workers`` the intake processes and ``delivery`` the outbound side for ``/healthz``.
    With ``forward`` (in a web process of its own), the paths of :data:`FORWARDED` are
    handed to it instead; ``webProcess`` reports that process for ``/healthz``.
    """
    root = WebRoot(
        BasicLogin(portal, throttle),
        NotificationStatus(store, clock, config.limits.status_retention_days),
        Health(
            store, clock, listenersUp, workers=workers, delivery=delivery, webProcess=webProcess
        ),
        openAPIDocument(),
        smsReceipts,
        forward,
    )
    site = QuietSite(root, requestFactory=BoundedRequest, timeout=REQUEST_TIMEOUT)
    # Plain HTTP/1.1 channels whose request heads have a deadline (a client dribbling headers
    # is timed out); the endpoint speaks no HTTP/2.
    site.protocol = HeadDeadlineChannel  # type: ignore[assignment]
    site.displayTracebacks = False
    return site
