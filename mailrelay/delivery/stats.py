"""The delivery engine's Prometheus metrics, served at ``/metrics`` with the others."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from mailrelay.metrics import REGISTRY

deliveries = Counter(
    "mailrelay_deliveries",
    "Recipient delivery attempts by outcome (delivered, deferred, failed, expired)",
    ["outcome"],
    registry=REGISTRY,
)
bounces = Counter(
    "mailrelay_bounces", "Delivery status notifications queued to senders", registry=REGISTRY
)
oldestDue = Gauge(
    "mailrelay_queue_oldest_due_seconds",
    "How long the longest-waiting due queue entry has been due (0: none due)",
    registry=REGISTRY,
)
connectionsOpen = Gauge(
    "mailrelay_delivery_connections",
    "Outbound SMTP connections open, by destination",
    ["destination"],
    registry=REGISTRY,
)
inFlight = Gauge(
    "mailrelay_deliveries_in_flight", "Notifications being delivered now", registry=REGISTRY
)

_byOutcome: dict[str, Counter] = {}


def countOutcome(outcome: str) -> None:
    """Count one recipient's attempt ending in ``outcome``."""
    child = _byOutcome.get(outcome)
    if child is None:
        child = _byOutcome[outcome] = deliveries.labels(outcome)
    child.inc()
