"""
The HTTP channel of the web endpoint: Twisted's, with a deadline on each request's head.

Twisted's idle timeout starts again at every byte, so a client that sends a header line a byte
at a time (slowloris) keeps a connection for as long as it likes. Here the request line and
headers must be complete within ``headDeadline`` seconds of the connection (or of the previous
response, on a kept-alive connection); else the connection is timed out as an idle one is --
closed, and aborted ``abortTimeout`` seconds later if the client does not let it close.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel

HEAD_DEADLINE = 30.0
"""Seconds a request's line and headers may take to arrive."""


class HeadDeadlineChannel(HTTPChannel):
    """An HTTP/1.1 channel whose request heads must arrive within ``headDeadline`` seconds."""

    headDeadline = HEAD_DEADLINE
    _headCall: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._awaitHead()

    def allHeadersReceived(self) -> None:
        self._cancelHead()
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        if self.persistent and self.transport is not None and not self._headPending():
            self._awaitHead()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancelHead()
        super().connectionLost(reason)

    def _awaitHead(self) -> None:
        self._cancelHead()
        self._headCall = self.callLater(self.headDeadline, self._headTooSlow)

    def _headPending(self) -> bool:
        return self._headCall is not None and self._headCall.active()

    def _cancelHead(self) -> None:
        if self._headPending():
            assert self._headCall is not None
            self._headCall.cancel()
        self._headCall = None

    def _headTooSlow(self) -> None:
        self._headCall = None
        self.timeoutConnection()
