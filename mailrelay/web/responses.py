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
