"""
The web process's way to the main process: the requests it does not answer itself
(``/healthz``, ``/metrics``, ``POST /dlr/sms``: what the main process knows, of every
process) go, as they came, to the main process's private web listener on the loopback
interface, and its answer comes back as it was given (:mod:`mailrelay.workers.web`).
"""

from __future__ import annotations

from typing import Any

import treq
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web import server
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from mailrelay.web.responses import Response, errorResponse, writeResponse

log = Logger()

FORWARD_TIMEOUT = 30.0
"""Seconds the main process has to answer a forwarded request (a /metrics scrape counts the
whole queue: about 0.1 s a million entries)."""
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host"}
)
_ANSWER_HEADERS = frozenset({b"content-type", b"cache-control", b"allow", b"retry-after"})
"""What of the main process's answer is relayed; writeResponse sets the rest."""


class _QuietPool(HTTPConnectionPool):
    """A pool whose new connections log no "Starting factory" line each."""

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor, persistent=True)
        self._factory = _quietFactory(self._factory)


def _quietFactory(factory: Any) -> Any:
    return type("QuietHTTP11ClientFactory", (factory,), {"noisy": False})


class MainProcessForward:
    """Answers a request with the main process's answer to it (at ``127.0.0.1:port``), over
    kept-alive connections; 503 when the main process does not answer."""

    def __init__(self, reactor: Any, port: int) -> None:
        self._origin = f"http://127.0.0.1:{port}"
        pool = _QuietPool(reactor)
        pool.maxPersistentPerHost = 4
        self._pool = pool
        self._client = treq.client.HTTPClient(Agent(reactor, pool=pool))

    def __call__(self, request: server.Request) -> None:
        """Forward ``request`` and write the answer on it (later)."""
        Deferred.fromCoroutine(self._forward(request))

    async def _forward(self, request: server.Request) -> None:
        finished = request.notifyFinish()
        lost: list[bool] = []
        finished.addErrback(lambda _: lost.append(True))
        try:
            response = await self._ask(request)
        except Exception as e:
            log.warn("web process: the main process did not answer: {error}", error=repr(e))
            response = errorResponse(503)
        if not lost:
            writeResponse(request, response)

    async def _ask(self, request: server.Request) -> Response:
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in _HOP_BY_HOP:
                headers.setRawHeaders(name, values)
        assert request.content is not None
        request.content.seek(0)
        body = request.content.read()
        answer = await self._client.request(
            request.method.decode("ascii"),
            self._origin + request.uri.decode("ascii"),
            headers=headers,
            data=body or None,
            timeout=FORWARD_TIMEOUT,
        )
        content = await treq.content(answer)
        kept = {
            name.lower(): values[0].decode("latin-1")
            for name, values in answer.headers.getAllRawHeaders()
            if name.lower() in _ANSWER_HEADERS
        }
        return Response(
            answer.code,
            content,
            contentType=kept.pop(b"content-type", "application/octet-stream"),
            cacheControl=kept.pop(b"cache-control", "no-store"),
            headers=tuple((name.decode("ascii").title(), value) for name, value in kept.items()),
        )

    def close(self) -> Deferred[None]:
        """Close the kept-alive connections."""
        return self._pool.closeCachedConnections()
