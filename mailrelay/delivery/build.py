"""The delivery side of the service tree, built from ``[delivery]``: nothing in hold mode."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

from mailrelay.config import Config
from mailrelay.delivery.engine import DeliveryEngine
from mailrelay.delivery.inflow import InFlow
from mailrelay.delivery.router import MXRouter, Router, SmarthostRouter
from mailrelay.delivery.schedule import RetrySchedule
from mailrelay.delivery.service import DeliveryService, LoopSettings
from mailrelay.delivery.sms.build import SmsParts, makeSms
from mailrelay.delivery.smtp.client import Timeouts
from mailrelay.delivery.smtp.mtasts import MTASTSPolicies
from mailrelay.delivery.smtp.mx import MXResolver, makeResolver
from mailrelay.delivery.smtp.pool import SMTPClientPool
from mailrelay.delivery.smtp.safeagent import safeAgent
from mailrelay.interfaces import IStore
from mailrelay.message.tracking import Tracker
from mailrelay.netaddress import AddressPolicy


def makeRouter(config: Config, reactor: Any) -> Router:
    """The router of ``delivery.mode`` (smarthost or mx). Raises ConfigError for a smarthost
    or password file it cannot use."""
    delivery = config.delivery
    assert delivery.mode != "hold"
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
    tracker: Tracker | None = None,
) -> DeliveryService | None:
    """The delivery loop for ``config`` on ``store``, or None in hold mode without an SMS
    gateway (with one, the loop sends SMS and holds e-mail). Its ``sms`` is the SMS
    channel's parts when ``[sms] gateway`` is set (the gateway's service goes in the tree
    before the loop, so it stops after it)."""
    delivery = config.delivery
    sms: SmsParts | None = makeSms(config, store, reactor)
    if delivery.mode == "hold" and sms is None:
        return None
    pool = SMTPClientPool(
        reactor,
        heloName=config.hostname,
        timeouts=Timeouts(
            connect=delivery.seconds("connect_timeout"),
            command=delivery.seconds("command_timeout"),
            data=delivery.seconds("data_timeout"),
        ),
        # Every relay process delivers: each opens its part of the connections.
        maxConnections=config.perProcess(delivery.max_connections),
        maxPerDestination=config.perProcess(delivery.max_connections_per_destination),
        maxRecipientsPerTransaction=delivery.max_recipients_per_transaction,
    )
    engine = DeliveryEngine(
        store,
        None if delivery.mode == "hold" else makeRouter(config, reactor),
        pool,
        reactor,
        hostname=config.hostname,
        schedule=RetrySchedule.fromConfig(delivery),
        tracker=tracker,
        sms=None if sms is None else sms.channel,
    )
    settings = LoopSettings(
        leaseSeconds=delivery.seconds("lease"),
        concurrency=max(2 * config.perProcess(delivery.max_connections), 10),
    )
    service = DeliveryService(
        store,
        engine,
        reactor,
        settings,
        closePool=pool.close,
        whenReady=whenReady,
        connections=pool.openConnections,
        inFlow=InFlow(reactor, config.limits.in_flow_delay, settings.concurrency),
    )
    service.sms = sms
    return service
