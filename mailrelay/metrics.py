"""
Prometheus metrics, in one registry of mailrelay's own (served at ``/metrics``).

The protocol and the store update these; the web resource only renders them, adding the
values that are read at scrape time (queue depth, store latency).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

connections = Counter(
    "mailrelay_connections", "SMTP connections accepted", ["listener"], registry=REGISTRY
)
sessions = Gauge(
    "mailrelay_sessions_active", "SMTP sessions currently open", ["listener"], registry=REGISTRY
)
authentications = Counter(
    "mailrelay_auth", "SMTP and HTTP logins by outcome", ["result"], registry=REGISTRY
)
messages = Counter(
    "mailrelay_messages",
    "Messages answered at the end of DATA, by reply code",
    ["code"],
    registry=REGISTRY,
)
queueDepth = Gauge("mailrelay_queue_depth", "Queue entries by state", ["state"], registry=REGISTRY)
storeLatency = Histogram(
    "mailrelay_store_ping_seconds",
    "Round trip of a store ping",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
)


_messagesByCode: dict[int, Counter] = {}


def countMessage(code: int) -> None:
    """Count one message answered with ``code`` (the labelled child is looked up once)."""
    child = _messagesByCode.get(code)
    if child is None:
        child = _messagesByCode[code] = messages.labels(str(code))
    child.inc()
