"""The delivery side of the service tree, built from ``[delivery]``: nothing in hold mode."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

from mailrelay.config import Config
from mailrelay.delivery.engine import DeliveryEngine
from mailrelay.delivery.router import MXRouter, Router, SmarthostRouter
from mailrelay.delivery.schedule import RetrySchedule
from mailrelay.delivery.service import DeliveryService, LoopSettings
from mailrelay.delivery.smtp.client import Timeouts
from mailrelay.delivery.smtp.mtasts import MTASTSPolicies
from mailrelay.delivery.smtp.mx import MXResolver, makeResolver
from mailrelay.delivery.smtp.pool import SMTPClientPool
from mailrelay.delivery.smtp.safeagent import safeAgent
from mailrelay.interfaces import IStore
from mailrelay.netaddress import AddressPolicy


def makeRouter(config: Config, reactor: Any) -> Router:
    """The router of ``delivery.mode`` (smarthost or mx). Raises ConfigError for a smarthost
    or password file it cannot use."""
    delivery = config.delivery
    if delivery.mode == "smarthost":
        return SmarthostRouter(delivery)
    addresses = AddressPolicy(delivery.allow_networks)
    resolver = makeResolver(delivery.nameservers, reactor)
    policies = MTASTSPolicies(resolver, safeAgent(reactor, resolver, addresses), reactor)
    return MXRouter(
        MXResolver(resolver, addresses, port=delivery.mx_port),
        policies,
        dict(delivery.tls_policy),
        delivery.ca_file,
    )


def makeDelivery(
    config: Config,
    store: IStore,
    reactor: Any,
    whenReady: Callable[[], Deferred[None]] | None = None,
) -> DeliveryService | None:
    """The delivery loop for ``config`` on ``store``, or None in hold mode."""
    delivery = config.delivery
    if delivery.mode == "hold":
        return None
    pool = SMTPClientPool(
        reactor,
        heloName=config.hostname,
        timeouts=Timeouts(
            connect=delivery.seconds("connect_timeout"),
            command=delivery.seconds("command_timeout"),
            data=delivery.seconds("data_timeout"),
        ),
        maxConnections=delivery.max_connections,
        maxPerDestination=delivery.max_connections_per_destination,
        maxRecipientsPerTransaction=delivery.max_recipients_per_transaction,
    )
    engine = DeliveryEngine(
        store,
        makeRouter(config, reactor),
        pool,
        reactor,
        hostname=config.hostname,
        schedule=RetrySchedule.fromConfig(delivery),
    )
    settings = LoopSettings(
        leaseSeconds=delivery.seconds("lease"),
        concurrency=max(2 * delivery.max_connections, 10),
    )
    return DeliveryService(
        store,
        engine,
        reactor,
        settings,
        closePool=pool.close,
        whenReady=whenReady,
        connections=pool.openConnections,
    )
