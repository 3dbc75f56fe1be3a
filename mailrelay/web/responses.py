"""
What every HTTP answer of the web endpoint looks like: a :class:`Response` value written by
:func:`writeResponse`, with the same safety headers on all of them, and JSON error bodies that
carry a status and a fixed message -- never an exception text, a path or a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.iweb import IRequest

JSON_TYPE = "application/json"
NO_STORE = "no-store"
SERVER_NAME = b"mailrelay"

_MESSAGES = {
    400: "bad request",
    401: "authentication required",
    403: "forbidden",
    404: "not found",
    405: "method not allowed",
    413: "the API takes no request body",
    429: "too many failed logins; retry later",
    500: "internal error",
    503: "service unavailable",
}


@dataclass(frozen=True)
class Response:
    """A complete answer: status code, body and the headers particular to it."""

    code: int
    body: bytes
    contentType: str = JSON_TYPE
    cacheControl: str = NO_STORE
    headers: tuple[tuple[str, str], ...] = ()


def jsonResponse(
    code: int,
    document: Mapping[str, Any],
    headers: tuple[tuple[str, str], ...] = (),
    cacheControl: str = NO_STORE,
) -> Response:
    """``document`` as a compact, ASCII-only JSON body."""
    body = json.dumps(document, separators=(",", ":")).encode("ascii")
    return Response(code, body, headers=headers, cacheControl=cacheControl)


def errorResponse(
    code: int, message: str | None = None, headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    """
    The JSON error body ``{"error": {"code": <code>, "message": "..."}}``. ``message`` must be
    a fixed text written for clients (it defaults to a generic one for the code).
    """
    text = message or _MESSAGES.get(code, "error")
    return jsonResponse(code, {"error": {"code": code, "message": text}}, headers=headers)


def writeResponse(request: IRequest, response: Response) -> None:
    """Write ``response`` on ``request`` and finish it."""
    # The reason phrase from the standard library: twisted.web's table lacks some (429).
    request.setResponseCode(response.code, HTTPStatus(response.code).phrase.encode("ascii"))
    request.setHeader(b"Server", SERVER_NAME)
    request.setHeader(b"Content-Type", response.contentType.encode("ascii"))
    request.setHeader(b"Content-Length", b"%d" % len(response.body))
    request.setHeader(b"Cache-Control", response.cacheControl.encode("ascii"))
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    for name, value in response.headers:
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    request.write(response.body)
    request.finish()


class JSONErrorRequest(server.Request):
    """
    A request whose unexpected failures (an exception the resource did not turn into a
    response) answer a generic JSON 500 instead of Twisted's HTML page. The failure is logged.
    """

    _log = Logger()

    def processingFailed(self, reason: Failure) -> Failure:
        self._log.failure("web request failed", failure=reason)
        if not self.startedWriting:
            writeResponse(self, errorResponse(500))
        elif not self.finished:
            self.finish()
        return reason


MAX_REQUEST_BODY = 16 * 1024
"""The most request body the endpoint reads. Its resources read none, but twisted.web would
keep any amount (a temporary file past 100 KB) before a resource saw the request."""


class BoundedRequest(JSONErrorRequest):
    """
    The web endpoint's request: a body over :data:`MAX_REQUEST_BODY` (declared, or counted
    as a chunked one arrives) is answered ``413`` with the JSON error body, and the
    connection closed, before any more of it is read.
    """

    _bodyRead = 0
    _refused = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_REQUEST_BODY:
            self._refuseBody()
        super().gotLength(length if length is None or length <= MAX_REQUEST_BODY else 0)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._bodyRead += len(data)
        if self._bodyRead > MAX_REQUEST_BODY:
            self._refuseBody()
            return
        super().handleContentChunk(data)

    def _refuseBody(self) -> None:
        # No method or version has been read into the request yet (that happens once the
        # whole body is in), so the answer is written as it must appear on the wire.
        self._refused = True
        response = errorResponse(413)
        head = (
            "HTTP/1.1 413 Content Too Large\r\n"
            f"Server: {SERVER_NAME.decode()}\r\n"
            f"Content-Type: {response.contentType}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            f"Cache-Control: {response.cacheControl}\r\n"
            "X-Content-Type-Options: nosniff\r\n"
            "Connection: close\r\n\r\n"
        )
        transport = self.channel.transport
        assert transport is not None, "a request arrives on a connected channel"
        transport.write(head.encode("ascii") + response.body)
        self.channel.loseConnection()
