"""
Operations endpoints: ``/healthz`` (is the relay able to work) and ``/metrics`` (Prometheus).

Both read the store at request time: a ping, bounded by ``pingTimeout`` so that a hung backend
makes the health check fail rather than hang, and for metrics the queue depth. Counting the
queue reads the whole queue in the SQLite store (tens of milliseconds per million messages, on
the thread that also answers the status API), and neither endpoint asks for credentials, so
the counts are taken at most once per ``QUEUE_STATS_MAX_AGE`` seconds and requests that come
while they are being taken wait for that one count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceCollection
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailrelay import metrics
from mailrelay.delivery.service import DeliveryProbe
from mailrelay.interfaces import IStore
from mailrelay.model import QueueStats
from mailrelay.recent import RecentResult
from mailrelay.web.responses import Response, jsonResponse

PING_TIMEOUT = 2.0
"""Seconds a store ping may take before the store counts as unreachable."""
QUEUE_STATS_MAX_AGE = 1.0
"""Seconds the queue counts of one ``/metrics`` request serve the requests after it."""

log = Logger()


@dataclass(frozen=True)
class ListenerState:
    """One SMTP listener as the health check reports it."""

    endpoint: str
    up: bool


ListenerProbe = Callable[[], Iterable[ListenerState]]
"""Called at each health check: the state of every SMTP listener."""


WorkerProbe = Callable[[], tuple[int, int]]
"""Called at each health check: (intake processes configured, processes serving now)."""


WebProcessProbe = Callable[[], bool]
"""Called at each health check when the web endpoint has a process of its own: whether that
process serves now (while it does not, the main process answers the endpoint itself)."""


def oneProcess() -> tuple[int, int]:
    """The probe of a relay that runs no worker processes: the main one serves alone."""
    return (1, 1)


def noListeners() -> list[ListenerState]:
    """The probe of a web site that serves no SMTP listeners (tests, tools)."""
    return []


def serviceListeners(parent: IServiceCollection, endpoints: Sequence[str]) -> ListenerProbe:
    """
    A probe of the SMTP listeners under ``parent``: the first ``len(endpoints)`` stream server
    services, in the order they were added, named by ``endpoints`` (the configured listener
    endpoint strings, in the same order). A listener is up while its service runs: the tap makes
    a failure to bind fail the start, so a running service is a bound port.
    """

    def probe() -> list[ListenerState]:
        services = [s for s in parent if isinstance(s, StreamServerEndpointService)]
        return [
            ListenerState(endpoint, bool(service.running))
            for endpoint, service in zip(endpoints, services, strict=False)
        ]

    return probe


class Health:
    """Answers ``/healthz`` and ``/metrics`` for one store."""

    def __init__(
        self,
        store: IStore,
        clock: IReactorTime,
        listeners: ListenerProbe = noListeners,
        pingTimeout: float = PING_TIMEOUT,
        workers: WorkerProbe = oneProcess,
        delivery: DeliveryProbe | None = None,
        webProcess: WebProcessProbe | None = None,
    ) -> None:
        self._store = store
        self._webProcess = webProcess
        self._delivery = delivery
        self._clock = clock
        self._listeners = listeners
        self._workers = workers
        self._pingTimeout = pingTimeout
        self._queueStats: RecentResult[QueueStats] = RecentResult(
            store.stats, clock, QUEUE_STATS_MAX_AGE
        )

    async def _ping(self) -> float | None:
        """The store's round trip in seconds, or None if it failed or took too long."""
        d: Deferred[float] = self._store.ping()
        d.addTimeout(self._pingTimeout, self._clock)
        try:
            return float(await d)
        except Exception as e:
            log.warn("store ping failed: {error}", error=type(e).__name__)
            return None

    async def healthz(self) -> Response:
        """200 ``{"status": "ok", ...}`` when the store answers and every listener is up;
        503 with the same shape and ``"status": "unavailable"`` otherwise."""
        latency = await self._ping()
        listeners = list(self._listeners())
        delivering = self._delivery is None or self._delivery.healthy
        healthy = latency is not None and delivering and all(s.up for s in listeners)
        document: dict[str, Any] = {
            "status": "ok" if healthy else "unavailable",
            "store": {
                "backend": self._store.name,
                "ok": latency is not None,
                "latency_ms": None if latency is None else round(latency * 1000, 3),
            },
            "listeners": [{"endpoint": s.endpoint, "up": s.up} for s in listeners],
        }
        # A worker that ended is being restarted and the others serve on: reported, not unhealthy.
        configured, serving = self._workers()
        document["workers"] = {"configured": configured, "serving": serving}
        if self._webProcess is not None:
            # Reported, not unhealthy either: the main process answers while it restarts.
            document["web_process"] = {"serving": self._webProcess()}
        if self._delivery is not None:
            document["delivery"] = self._delivery.document()
        return jsonResponse(200 if healthy else 503, document)

    async def metrics(self) -> Response:
        """The Prometheus text exposition of :data:`mailrelay.metrics.REGISTRY`, with the queue
        depth (at most a second old) and a store ping taken now (if the store fails, the other
        metrics still render)."""
        latency = await self._ping()
        if latency is not None:
            metrics.storeLatency.observe(latency)
            try:
                stats = await self._queueStats.get()
            except Exception as e:
                log.warn("queue stats failed: {error}", error=type(e).__name__)
            else:
                for state in ("queued", "deferred", "in_flight", "held"):
                    metrics.queueDepth.labels(state).set(getattr(stats, state))
            if self._delivery is not None:
                try:
                    await self._delivery.updateMetrics()
                except Exception as e:
                    log.warn("delivery metrics failed: {error}", error=type(e).__name__)
        return Response(200, generate_latest(metrics.REGISTRY), contentType=CONTENT_TYPE_LATEST)
