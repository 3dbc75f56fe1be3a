"""
Prometheus metrics, in registries of mailrelay's own; :data:`REGISTRY` is served at ``/metrics``.

The protocol and the web login count into :data:`PROCESS` (this process's SMTP and login
counters); the store-wide values (queue depth, store latency) are set by the web resource at
scrape time straight into :data:`REGISTRY`. With worker processes (``workers > 1``) each worker
sends a :func:`snapshot` of its counters to the main process about once a second, and
:data:`REGISTRY` serves the sum of the main process's and every worker's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric
from prometheus_client.registry import Collector

PROCESS = CollectorRegistry(auto_describe=True)
REGISTRY = CollectorRegistry(auto_describe=True)

connections = Counter(
    "mailrelay_connections", "SMTP connections accepted", ["listener"], registry=PROCESS
)
sessions = Gauge(
    "mailrelay_sessions_active", "SMTP sessions currently open", ["listener"], registry=PROCESS
)
authentications = Counter(
    "mailrelay_auth", "SMTP and HTTP logins by outcome", ["result"], registry=PROCESS
)
messages = Counter(
    "mailrelay_messages",
    "Messages answered at the end of DATA, by reply code",
    ["code"],
    registry=PROCESS,
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


Snapshot = dict[str, list[list[Any]]]
"""Family name -> ``[sample name, labels, value]`` of each sample: JSON as it is."""


def snapshot() -> Snapshot:
    """This process's counters and gauges, for the main process to add up."""
    return {
        family.name: [
            [sample.name, sample.labels, sample.value]
            for sample in family.samples
            if not sample.name.endswith("_created")  # a time, not a count: not to be added
        ]
        for family in PROCESS.collect()
    }


class _AllProcesses(Collector):
    """:data:`PROCESS`'s families, with the workers' latest snapshots added in. A counter of
    a worker that ended is kept (as ``retired``), so the sums never go backwards."""

    def __init__(self) -> None:
        self.workers: dict[int, Snapshot] = {}
        self.retired: Snapshot = {}

    def collect(self) -> Iterator[Metric]:
        for family in PROCESS.collect():
            totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                totals[key] = totals.get(key, 0.0) + sample.value
            for other in [self.retired, *self.workers.values()]:
                for name, labels, value in other.get(family.name, []):
                    key = (name, tuple(sorted(labels.items())))
                    totals[key] = totals.get(key, 0.0) + value
            merged = Metric(family.name, family.documentation, family.type, family.unit)
            for (name, labels), value in totals.items():
                merged.add_sample(name, dict(labels), value)
            yield merged

    def retire(self, index: int) -> None:
        """Worker ``index`` ended: keep its counters, forget its gauges."""
        last = self.workers.pop(index, None)
        if last is None:
            return
        kinds = {family.name: family.type for family in PROCESS.collect()}
        for name, samples in last.items():
            if kinds.get(name) != "counter":
                continue
            totals = {
                (sample, tuple(sorted(labels.items()))): value
                for sample, labels, value in self.retired.get(name, [])
            }
            for sample, labels, value in samples:
                key = (sample, tuple(sorted(labels.items())))
                totals[key] = totals.get(key, 0.0) + value
            self.retired[name] = [[n, dict(labels), v] for (n, labels), v in totals.items()]


workerMetrics = _AllProcesses()
REGISTRY.register(workerMetrics)
