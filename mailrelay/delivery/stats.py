"""
The delivery engine's Prometheus metrics, served at ``/metrics`` with the others. Every relay
process delivers, so what each process counts (attempts, bounces, what is in flight, its
connections) is in :data:`~mailrelay.metrics.PROCESS`, which the main process adds up over
the workers; what the store knows for all of them (the oldest due entry) is set at a scrape.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from mailrelay.metrics import PROCESS, REGISTRY

deliveries = Counter(
    "mailrelay_deliveries",
    "Recipient delivery attempts by outcome (delivered, deferred, failed, expired)",
    ["outcome"],
    registry=PROCESS,
)
bounces = Counter(
    "mailrelay_bounces", "Delivery status notifications queued to senders", registry=PROCESS
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
    registry=PROCESS,
)
claimSeconds = Histogram(
    "mailrelay_delivery_claim_seconds",
    "Time one claim of due queue entries took (the store's read and write)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    registry=PROCESS,
)
inFlight = Gauge(
    "mailrelay_deliveries_in_flight", "Notifications being delivered now", registry=PROCESS
)

_byOutcome: dict[str, Counter] = {}


def countOutcome(outcome: str) -> None:
    """Count one recipient's attempt ending in ``outcome``."""
    child = _byOutcome.get(outcome)
    if child is None:
        child = _byOutcome[outcome] = deliveries.labels(outcome)
    child.inc()
