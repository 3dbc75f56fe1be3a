"""
The public tracking endpoint of SPEC §8.5 (``[tracking] endpoint``, a listener of its own,
not the status API's): ``GET /t/o/<token>`` answers a 1x1 GIF and records ``OPENED``;
``GET /t/c/<token>`` redirects to the link inside the token and records ``CLICKED``. Each
event goes to the trail with its report to the message's ``X-IB-tracking-url`` in one store
write. A token that does not verify answers 404: the endpoint is no open redirect.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mailrelay.delivery.reports import trackingReports
from mailrelay.interfaces import IStore
from mailrelay.message.tracking import TrackedToken, Tracker
from mailrelay.model import StatusEvent, fromTimestamp

log = Logger()

PIXEL = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00"
    b"\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
"""A transparent 1x1 GIF."""


class TrackingResource(Resource):
    """``/t/o/<token>`` and ``/t/c/<token>`` (mounted at ``t``)."""

    isLeaf = True

    def __init__(self, tracker: Tracker, store: IStore, clock: IReactorTime) -> None:
        super().__init__()
        self._tracker = tracker
        self._store = store
        self._clock = clock

    def render_GET(self, request: Request) -> Any:
        path = [segment.decode("ascii", "replace") for segment in request.postpath or []]
        token = None
        if len(path) == 2 and path[0] in ("o", "c"):
            token = self._tracker.read(path[0], path[1])  # type: ignore[arg-type]
        if token is None:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain")
            return b"not found\n"
        d = Deferred.fromCoroutine(self._record(token))
        d.addErrback(lambda f: log.failure("tracking: event not recorded", f))
        d.addCallback(lambda _: self._answer(request, token))
        return NOT_DONE_YET

    def _answer(self, request: Request, token: TrackedToken) -> None:
        request.setHeader(b"cache-control", b"no-store")
        if token.kind == "c":
            request.redirect(token.link.encode())
            request.finish()
            return
        request.setHeader(b"content-type", b"image/gif")
        request.write(PIXEL)
        request.finish()

    async def _record(self, token: TrackedToken) -> None:
        notification = await self._store.getNotification(token.notification_id)
        if notification is None:  # expired: the link still works
            return
        event = StatusEvent(
            notification.notification_id,
            token.recipient,
            "CLICKED" if token.kind == "c" else "OPENED",
            token.link or "Opened",
            fromTimestamp(self._clock.seconds()),
        )
        await self._store.addEventsWithReports([event], trackingReports(notification, event))


def makeTrackingSite(tracker: Tracker, store: IStore, clock: IReactorTime) -> Site:
    """The Site of the public tracking listener."""
    root = Resource()
    root.putChild(b"t", TrackingResource(tracker, store, clock))
    site = Site(root)
    site.tracking = True  # type: ignore[attr-defined]  # tests tell it from the status API's
    site.displayTracebacks = False
    return site
