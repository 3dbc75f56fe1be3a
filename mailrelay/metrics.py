"""
Prometheus metrics, in registries of mailrelay's own; :data:`REGISTRY` is served at ``/metrics``.

The protocol and the web login count into :data:`PROCESS` (this process's SMTP and login
counters); the store-wide values (queue depth, store latency) are set by the web resource at
scrape time straight into :data:`REGISTRY`, and the kernel's listen queue drops are read from
``/proc/net/netstat`` at scrape time (:class:`ListenQueueCollector`). With worker processes
(``workers > 1``) each worker sends a :func:`snapshot` of its counters to the main process
about once a second, and :data:`REGISTRY` serves the sum of the main process's and every
worker's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from mailrelay.listening import NETSTAT_PATH, listenQueueDrops

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
storeFailures = Counter(
    "mailrelay_store_failures",
    "Intake operations answered 451 because the store failed (logged once per outage)",
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


class ListenQueueCollector(Collector):
    """
    The kernel's counts of connections lost at listening sockets because an accept queue was
    full (``TcpExt`` ``ListenOverflows`` and ``ListenDrops`` in ``netstat``, what ``nstat``
    shows), read at each scrape. They count every listening socket of the relay's network
    namespace since boot, not only the relay's; where they cannot be read (not Linux) there are
    no samples. See docs/listeners.md.
    """

    def __init__(self, path: str = NETSTAT_PATH) -> None:
        self.path = path

    def collect(self) -> Iterator[Metric]:
        counts = listenQueueDrops(self.path)
        if counts is None:
            return
        yield CounterMetricFamily(
            "mailrelay_tcp_listen_overflows",
            "Connections the kernel dropped because a listening socket's accept queue was full "
            "(TcpExt ListenOverflows; every socket of the network namespace, since boot)",
            value=counts.overflows,
        )
        yield CounterMetricFamily(
            "mailrelay_tcp_listen_drops",
            "SYNs and handshakes the kernel dropped at a listening socket, overflows included "
            "(TcpExt ListenDrops; every socket of the network namespace, since boot)",
            value=counts.drops,
        )


# Scraped in the main process only (REGISTRY, not PROCESS): the counts are the namespace's, so
# a worker's copy would count the same drops again.
REGISTRY.register(ListenQueueCollector())
